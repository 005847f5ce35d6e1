"""Fused attention: sequence padding for cuDNN is exact; backend choice on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimjax.models.attention import Attention, fused_attention, fused_backend


def _reference(q, k, v, bias, key_mask, scale):
  """softmax(q·kᵀ·scale + bias) v per head in float64 numpy; masked keys get no weight."""
  q, k, v, bias = (np.asarray(x, np.float64) for x in (q, k, v, bias))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) * scale + bias
  logits = np.where(np.asarray(key_mask)[:, None, None, :], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', p, v)


def test_padded_fused_attention_equals_unpadded_reference_and_xla():
  # MAE's encoder sequence: 1 cls + 49 visible = 50 tokens, padded to 56 for cuDNN.
  b, t, h, d = 2, 50, 4, 16
  kq, kk, kv, kb = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(r, (b, t, h, d)) for r in (kq, kk, kv))
  bias = jax.random.normal(kb, (1, h, t, t))              # broadcast over the batch
  key_mask = np.ones((b, t), bool)
  key_mask[0, [3, 49]] = False
  mask = jnp.asarray(key_mask)[:, None, None, :]
  scale = d ** -0.5

  # Each computation one compiled program: eagerly every primitive compiles on its own.
  @jax.jit
  def padded(q, k, v):
    return fused_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation='xla',
                           pad_multiple=8)

  out = padded(q, k, v)
  assert out.shape == (b, t, h, d)
  np.testing.assert_allclose(out, _reference(q, k, v, bias, key_mask, scale), atol=2e-6)
  unpadded = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask, scale=scale, implementation='xla'))
  np.testing.assert_allclose(out, unpadded(q, k, v), atol=1e-6)
  # Gradients too: padded query rows and keys must not leak into the real ones.
  loss = lambda f: lambda *a: jnp.sum(f(*a) * jnp.arange(d))
  g_pad = jax.jit(jax.grad(loss(padded), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(loss(unpadded), argnums=(0, 1, 2)))(q, k, v)
  for a, r in zip(g_pad, g_ref):
    np.testing.assert_allclose(a, r, atol=1e-5)
  # Padding without cutting the padded keys would give them weight exp(0 + 0): detectable.
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 6), (0, 0), (0, 0)))
  leaky = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, pad(k), pad(v), bias=jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, 6))),
      mask=jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, 6)), constant_values=True),
      scale=scale))(q, k, v)
  assert np.abs(np.asarray(leaky) - np.asarray(out)).max() > 1e-3


def test_fused_module_matches_xla_module_with_bias_and_mask():
  x = jax.random.normal(jax.random.key(1), (2, 50, 32))
  bias = jax.random.normal(jax.random.key(2), (2, 4, 50, 50))
  key_mask = jnp.arange(50)[None, :] < jnp.array([[50], [41]])
  xla = Attention(4, implementation='xla')
  params = jax.jit(xla.init)(jax.random.key(3), x)  # one program each, not one per primitive
  want, _ = jax.jit(xla.apply)(params, x, logit_bias=bias, key_mask=key_mask)
  got, probs = jax.jit(Attention(4, implementation='fused').apply)(
      params, x, logit_bias=bias, key_mask=key_mask)
  assert probs is None
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_fused_backend_is_xla_on_cpu_and_for_float32():
  assert fused_backend(jnp.bfloat16, 64) == ('cudnn' if jax.default_backend() == 'gpu'
                                             else 'xla')
  assert fused_backend(jnp.float32, 64) == 'xla'     # cuDNN flash attention: bf16/fp16 only
  assert fused_backend(jnp.bfloat16, 12) == 'xla'    # head dim must be a multiple of 8


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs a GPU')
def test_cudnn_padded_attention_matches_xla_on_gpu():
  # MRE's biased encoder in training: 197 tokens is odd, which cuDNN rejects unless padded.
  b, t, h, d = 2, 197, 12, 64
  kq, kk, kv, kb = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(r, (b, t, h, d), jnp.bfloat16) for r in (kq, kk, kv))
  bias = jax.random.normal(kb, (b, h, t, t), jnp.bfloat16)
  loss = lambda impl: lambda q, k, v: jnp.sum(fused_attention(
      q, k, v, bias=bias, scale=d ** -0.5, implementation=impl).astype(jnp.float32) ** 2)
  got = jax.value_and_grad(loss('cudnn'), argnums=(0, 1, 2))(q, k, v)
  want = jax.value_and_grad(loss('xla'), argnums=(0, 1, 2))(q, k, v)
  for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32),
                               rtol=3e-2, atol=3e-2)
