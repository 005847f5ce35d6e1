"""Multi-head attention with an optional additive logit bias and key mask.

Every attention in mimjax goes through this module: plain ViT blocks, MAE decoders,
MRE (segment bias), proxy cross-attention and probes; `implementation` picks the einsum path,
jax.nn.dot_product_attention ('fused') or the Pallas kernel (mimjax/models/pallas_attention.py).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimjax.models import pallas_attention
from mimjax.models.segment_bias import SegmentTerms

Dtype = Any
# model.attention: 'xla' = einsum + softmax, 'fused' = jax.nn.dot_product_attention (cuDNN on
# GPU), 'pallas' = mimjax.models.pallas_attention (flash attention, MRE bias in-kernel).
IMPLEMENTATIONS = ('xla', 'fused', 'pallas')
# MAE/timm initialise every Linear with xavier-uniform; on the fused qkv matrix this is
# computed over (D, 3D), which is what a single Dense(3D) gives.
xavier = nn.initializers.xavier_uniform()


class Attention(nn.Module):
  """Multi-head (self- or cross-) attention; softmax always in float32.

  `logit_bias` is added to q·kᵀ *before* the 1/√d scaling, i.e. logits = (q·kᵀ + b)/√d,
  as in SAM-helps-SSL Eq. 5; it must broadcast to (B, heads, Nq, Nk). `segments` is the MRE
  bias as one layer's `SegmentTerms` (u of shape (heads,)), added the same way: the 'pallas'
  kernel forms it per tile, the other paths materialise it. `key_mask` (B, Nk) or (B, Nq, Nk) bool: False keys get no attention.
  With `return_attention` every implementation runs the einsum path (it needs the map).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  qkv_bias: bool = True
  implementation: str = 'xla'  # one of IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x: jnp.ndarray, kv: Optional[jnp.ndarray] = None, *,
               logit_bias: Optional[jnp.ndarray] = None,
               segments: Optional[SegmentTerms] = None,
               key_mask: Optional[jnp.ndarray] = None,
               return_attention: bool = False):
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f'model.attention={self.implementation!r}: expected one of '
                       f'{IMPLEMENTATIONS}')
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f'width {dim} not divisible by num_heads {self.num_heads}')
    head_dim = dim // self.num_heads
    dense = lambda f, name: nn.Dense(f, use_bias=self.qkv_bias, dtype=self.dtype,
                                     kernel_init=xavier, name=name)
    split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, head_dim))
    if kv is None:
      q, k, v = jnp.split(dense(3 * dim, 'qkv')(x), 3, axis=-1)
    else:  # cross-attention (proxy blocks, attentive probe)
      q = dense(dim, 'q')(x)
      k, v = jnp.split(dense(2 * dim, 'kv')(kv), 2, axis=-1)
    q, k, v = split(q), split(k), split(v)
    scale = head_dim ** -0.5

    if logit_bias is not None and segments is not None:
      raise ValueError('Attention: pass either logit_bias or segments (MRE), not both')
    use_pallas = self.implementation == 'pallas' and not return_attention
    if segments is not None and not use_pallas:
      logit_bias = segments.dense()  # the einsum and cuDNN paths add a materialised bias
    if use_pallas:
      if key_mask is not None:
        raise ValueError("model.attention='pallas' takes no key_mask (only sequence padding "
                         "is masked in-kernel); use 'xla' or 'fused'")
      if logit_bias is not None:
        raise ValueError("model.attention='pallas' takes the MRE bias as `segments` "
                         "(SegmentTerms), not a dense logit_bias")
      out = pallas_attention.flash_attention(q, k, v, scale=scale, segments=segments)
      probs = None
    elif self.implementation == 'fused' and not return_attention:
      bias = None if logit_bias is None else (logit_bias * scale).astype(q.dtype)
      mask = None if key_mask is None else _expand_mask(key_mask)
      out = fused_attention(q, k, v, bias=bias, mask=mask, scale=scale)
      probs = None
    else:
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
      if logit_bias is not None:
        logits = logits + logit_bias.astype(jnp.float32)
      logits = logits * scale
      if key_mask is not None:
        logits = jnp.where(_expand_mask(key_mask), logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1)
      out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)
    out = out.reshape(out.shape[:-2] + (dim,))
    out = nn.Dense(dim, dtype=self.dtype, kernel_init=xavier, name='proj')(out)
    return out, probs


def fused_backend(dtype: Any, head_dim: int) -> str:
  """'cudnn' where cuDNN flash attention applies (the devices compiled for are GPUs — the
  traced mesh's, else jax's default backend —, bf16/fp16, head dim ≤ 128 and a multiple of 8),
  else 'xla'. jax.nn.dot_product_attention's own default is always XLA."""
  ok = (pallas_attention.platform() == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0 and head_dim <= 128)
  return 'cudnn' if ok else 'xla'


def _pad_axis(x: jnp.ndarray, axis: int, size: int, value) -> jnp.ndarray:
  """Pads `axis` of x at the end to `size` (a broadcast axis of length 1 stays as it is)."""
  if x.shape[axis] in (1, size):
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def fused_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                    bias: Optional[jnp.ndarray] = None, mask: Optional[jnp.ndarray] = None,
                    scale: float, implementation: Optional[str] = None,
                    pad_multiple: Optional[int] = None) -> jnp.ndarray:
  """jax.nn.dot_product_attention on (B, T, H, D) inputs, with sequences padded if asked.

  `bias`/`mask` broadcast to (B, H, T, S) and are on the scaled logits. With `pad_multiple`
  (default: 8 for cuDNN, none for XLA) T and S are zero-padded to a multiple of it; padded keys
  are excluded through `key_value_seq_lengths` and padded query rows are dropped, so the result
  equals the unpadded one. cuDNN needs this for odd lengths with a bias in training (MAE's
  1 + 49 = 50 tokens are fine; MRE's biased 197-token encoder is not).
  """
  implementation = implementation or fused_backend(q.dtype, q.shape[-1])
  if pad_multiple is None:
    pad_multiple = 8 if implementation == 'cudnn' else 1
  t, s = q.shape[1], k.shape[1]
  tp, sp = -(-t // pad_multiple) * pad_multiple, -(-s // pad_multiple) * pad_multiple
  if (tp, sp) == (t, s):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                        implementation=implementation)
  q = _pad_axis(q, 1, tp, 0)
  k, v = _pad_axis(k, 1, sp, 0), _pad_axis(v, 1, sp, 0)
  if bias is not None:
    bias = _pad_axis(_pad_axis(bias, -2, tp, 0), -1, sp, 0)
  if mask is not None:  # padded query rows see every real key; padded keys are cut below
    mask = _pad_axis(_pad_axis(mask, -2, tp, True), -1, sp, False)
  lengths = jnp.full((q.shape[0],), s, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                     key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :t]


def _expand_mask(key_mask: jnp.ndarray) -> jnp.ndarray:
  """(B, Nk) → (B, 1, 1, Nk); (B, Nq, Nk) → (B, 1, Nq, Nk)."""
  if key_mask.ndim == 2:
    return key_mask[:, None, None, :]
  return key_mask[:, None, :, :]
