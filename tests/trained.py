"""Comparing parameters trained by two runs that reduce in another order (other device counts,
processes, hosts or compile options).

Where a parameter's true gradient is non-zero, round-off changes Adam's normalised step
g/(√v + eps) by about the gradient's own relative error, so tight tolerances hold. Where the true
gradient is exactly zero, the computed one is pure round-off, whose sign follows the reduction
order, and Adam scales it up to a step of size ~lr: two runs may then drift apart by up to the
sum of their steps. The one such parameter in our models is the key third of every fused
`qkv/bias` (softmax is shift-invariant per query, so q·b_k adds the same logit to every key).
Those entries are held to the bound Adam itself guarantees, not skipped and not given a loose
tolerance shared by everything else.
"""

import math
from collections.abc import Sequence

import jax
import numpy as np


def adam_step_bound(b1: float, b2: float, t: int) -> float:
  """The largest |m̂_t| / √v̂_t Adam can produce at step t (1-based), over all gradient histories.

  With m_t = (1-b1) Σ_j b1^j g_{t-j} and v_t = (1-b2) Σ_j b2^j g_{t-j}², Cauchy–Schwarz gives
  |m_t| ≤ (1-b1) · sqrt(Σ_{j<t} (b1²/b2)^j) · sqrt(v_t / (1-b2)); the bias corrections divide
  by (1-b1^t) and sqrt(1-b2^t). Equality holds for g_{t-j} ∝ (b1/b2)^j. eps only shrinks it.
  """
  r = b1 * b1 / b2
  geometric = sum(r ** j for j in range(t))
  return (1 - b1) / (1 - b1 ** t) * math.sqrt(geometric * (1 - b2 ** t) / (1 - b2))


def zero_gradient_drift(lrs: Sequence[float], b1: float, b2: float) -> float:
  """How far two runs can move a parameter whose true gradient is exactly zero (and that has no
  weight decay): each run moves it by at most Σ_t lr_t · adam_step_bound(t), in either sign."""
  return 2 * sum(lr * adam_step_bound(b1, b2, t) for t, lr in enumerate(lrs, start=1))


def _flat(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(x) for path, x in leaves}


def assert_trained_params_close(got, want, *, lrs: Sequence[float], b1: float, b2: float,
                                rtol: float = 1e-4, atol: float = 1e-6) -> None:
  """`got` ≈ `want` leaf by leaf at (rtol, atol); the key bias of each `qkv/bias` (exactly zero
  gradient) within `zero_gradient_drift(lrs, b1, b2)`. `lrs`: the learning rate of every step
  both runs took (metrics.jsonl's `lr`)."""
  flat_got, flat_want = _flat(got), _flat(want)
  assert flat_got.keys() == flat_want.keys() and flat_got, (
      sorted(flat_got.keys() ^ flat_want.keys()))
  drift = zero_gradient_drift(lrs, b1, b2)
  for name, b in flat_want.items():
    a = flat_got[name]
    if name.endswith('qkv/bias'):
      # The fused layout is (q, k, v) along the last axis (nn.Dense(3 * dim) split in 3).
      qa, ka, va = np.split(a, 3, axis=-1)
      qb, kb, vb = np.split(b, 3, axis=-1)
      np.testing.assert_allclose(ka, kb, rtol=0, atol=drift, err_msg=f'{name} (key part)')
      a, b = np.concatenate([qa, va], -1), np.concatenate([qb, vb], -1)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)
