"""Read-outs of ViT tokens for probes and evaluators: which tokens (block, final norm) and how
they are pooled ([cls]/prefix mean, MAE's global pool + untrained fc_norm)."""

from typing import Any

import jax
import jax.numpy as jnp

from mimjax.models.vit import ViT, model_dims

POOLS = ('cls', 'mean', 'abmilp', 'attentive')


def layer_norm(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  """LayerNorm without affine: MAE's `fc_norm` in a linear probe (weight 1, bias 0, frozen)."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def select_tokens(model: ViT, params: Any, images: jnp.ndarray, layer: int,
                  normed: bool = True, **kw) -> tuple[jnp.ndarray, dict]:
  """Tokens (B, T, D) after block `layer` (1-based; -1 = last). `normed` with layer -1 gives
  the final-LayerNorm output, else the raw block output (beyond-cls AbMILP, probes at layer 7)."""
  depth = model_dims(model.config)['depth']
  if layer != -1 and not 1 <= layer <= depth:
    raise ValueError(f'probe layer {layer}: expected -1 (last) or 1..{depth}')
  need_layers = layer != -1 or not normed
  tokens, aux = model.apply({'params': params}, images, return_layers=need_layers, **kw)
  if layer == -1 and normed:
    return tokens, aux
  return aux['layers'][(depth if layer == -1 else layer) - 1], aux


def reads_final_norm(how: str) -> bool:
  """Whether pooling `how` reads the final-LayerNorm output ('cls': MAE `--cls_token`;
  'attentive': CAE) or the raw last-block tokens ('mean': MAE `--global_pool`, beyond-cls and
  SemanticMIM `avg_featmap`, whose encoders skip the final norm; 'abmilp': beyond-cls)."""
  return how not in ('mean', 'abmilp')


def global_pool(tokens: jnp.ndarray, num_prefix: int = 1) -> jnp.ndarray:
  """MAE `forward_features` with global_pool, before `fc_norm`: the mean of the patch tokens
  (prefix tokens excluded) of the raw last-block output."""
  return tokens[:, num_prefix:].mean(axis=1)


def pool(tokens: jnp.ndarray, how: str, num_prefix: int = 1) -> jnp.ndarray:
  """'cls' → mean of the prefix tokens ([cls] itself for a plain ViT; SemanticMIM's CLS
  readout averages its proxies); 'mean' → fc_norm(global_pool(tokens)) with MAE's untrained
  fc_norm (weight 1, bias 0). Pass the tokens `reads_final_norm(how)` asks for."""
  if how == 'cls':
    return tokens[:, :num_prefix].mean(axis=1)
  if how == 'mean':
    return layer_norm(global_pool(tokens, num_prefix))
  raise ValueError(f'pool={how!r}: expected "cls" or "mean" (abmilp/attentive are trained heads)')
