"""Probe heads on frozen tokens: AbMILP (beyond-cls), CAE attentive pooler, BN + linear."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mimjax.models import readout
from mimjax.models.attention import Attention


def torch_linear_init(fan_in: int):
  """PyTorch's default Linear init for weight and bias: U(±1/√fan_in)."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class AbMILP(nn.Module):
  """beyond-cls selective aggregation (depth 1): a = softmax_j(w·x_j + b); returns Σ_j a_j x_j."""

  @nn.compact
  def __call__(self, patches: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    init = torch_linear_init(patches.shape[-1])
    scores = nn.Dense(1, kernel_init=init, bias_init=init, name='scorer')(patches)[..., 0]
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    return jnp.einsum('bn,bnd->bd', weights, patches.astype(jnp.float32)), weights


class AttentivePooler(nn.Module):
  """CAE attentive probe: one learned query cross-attends to all tokens; no residual, no MLP.

  Uses the shared `Attention`: its single kv input means one LayerNorm for keys and values
  (CAE has separate LN_k and LN_v), and a key bias (CAE fixes it at 0; it cannot change the
  softmax, since q·b is the same for every key).
  """
  num_heads: int

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    width = tokens.shape[-1]
    query = self.param('query', nn.initializers.truncated_normal(0.02), (1, 1, width))
    query = jnp.broadcast_to(query, (tokens.shape[0], 1, width))
    q = nn.LayerNorm(epsilon=1e-6, name='norm_q')(query)
    kv = nn.LayerNorm(epsilon=1e-6, name='norm_kv')(tokens)
    out, attn = Attention(self.num_heads, name='attn')(q, kv, return_attention=True)
    return out[:, 0], attn[:, :, 0]


NORMS = ('bn', 'ln')


class ProbeHead(nn.Module):
  """Pooling ('cls' | 'mean' | 'abmilp' | 'attentive') → read-out norm → Linear.

  Inputs are frozen tokens (B, T, D) with `num_prefix` [cls]/proxy tokens first. For 'abmilp'
  only the patch tokens are aggregated; 'attentive' attends to all tokens. Read-out norm
  (`config.norm`): 'bn' (default) = MAE's BatchNorm1d(affine=False, eps 1e-6); 'ln' =
  SemanticMIM's frozen `ln2` (parameter-free LayerNorm, eps 1e-6), no BatchNorm. Linear
  weight init trunc-normal `config.init_std` (MAE 0.01; mmpretrain LinearClsHead 0.02).
  """
  config: ml_collections.ConfigDict  # pool, num_classes, num_heads, norm, init_std
  num_prefix: int = 1

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, *, train: bool = False) -> tuple[jnp.ndarray, dict]:
    how = self.config.pool
    aux = {}
    if how in ('cls', 'mean'):
      x = readout.pool(tokens, how, self.num_prefix)
    elif how == 'abmilp':
      x, aux['weights'] = AbMILP(name='abmilp')(tokens[:, self.num_prefix:])
    elif how == 'attentive':
      x, aux['weights'] = AttentivePooler(self.config.get('num_heads', 12),
                                          name='attentive')(tokens)
    else:
      raise ValueError(f'config.probe.pool={how!r}: expected one of {readout.POOLS}')
    norm = self.config.get('norm', 'bn')
    x = x.astype(jnp.float32)
    if norm == 'bn':  # torch BatchNorm1d momentum 0.1 ≙ flax momentum 0.9.
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6,
                       use_scale=False, use_bias=False, name='bn')(x)
    elif norm == 'ln':
      if how != 'mean':  # pool 'mean' already ends in this LayerNorm (MAE's fc_norm)
        x = readout.layer_norm(x)
    else:
      raise ValueError(f'config.probe.norm={norm!r}: expected one of {NORMS}')
    std = float(self.config.get('init_std', 0.01))
    logits = nn.Dense(self.config.num_classes, kernel_init=nn.initializers.truncated_normal(std),
                      name='linear')(x)
    return logits, aux


def topk_correct(logits: jnp.ndarray, labels: jnp.ndarray, ks=(1, 5)) -> dict:
  """{'top{k}': (B,) 1.0 where the label is among the k highest scores}."""
  order = jnp.argsort(-logits, axis=-1)
  out = {}
  for k in ks:
    k_eff = min(k, logits.shape[-1])
    out[f'top{k}'] = jnp.any(order[:, :k_eff] == labels[:, None], axis=-1).astype(jnp.float32)
  return out

