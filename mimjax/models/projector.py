"""Projector / predictor MLPs (BYOL, MoCo v3, LUT): Linear → BatchNorm → ReLU → … → Linear.

LUT (naver-ai/lut `_build_mlp`): `depth` bias-free Linears (xavier-uniform, MAE init); every
hidden layer is followed by a norm and an activation; the output layer has neither.
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mimjax.models.attention import xavier
from mimjax.models.vit import DTYPES

NORMS = ('batch', 'none')
ACTIVATIONS = ('relu', 'gelu')


def default_config(out_dim: Optional[int] = None) -> ml_collections.ConfigDict:
  """LUT recipe: 2 layers, 4096 hidden, BatchNorm + ReLU; `out_dim` None → input width."""
  return ml_collections.ConfigDict({
      'depth': 2, 'mlp_dim': 4096, 'out_dim': out_dim, 'norm': 'batch', 'act': 'relu',
      'bn_momentum': 0.9,  # Flax convention: torch BatchNorm1d momentum 0.1
      'bn_eps': 1e-5,      # torch BatchNorm1d default
      'dtype': 'float32',
  })


def validate_config(config: ml_collections.ConfigDict, where: str) -> None:
  """One clear error naming `<where>.<key>` for a bad head config."""
  if not isinstance(config.depth, int) or config.depth < 0:
    raise ValueError(f'{where}.depth={config.depth!r}: expected an integer >= 0')
  if config.depth > 1 and (not isinstance(config.mlp_dim, int) or config.mlp_dim <= 0):
    raise ValueError(f'{where}.mlp_dim={config.mlp_dim!r}: expected a positive integer')
  if config.norm not in NORMS:
    raise ValueError(f'{where}.norm={config.norm!r}: expected one of {NORMS}')
  if config.act not in ACTIVATIONS:
    raise ValueError(f'{where}.act={config.act!r}: expected one of {ACTIVATIONS}')
  if not 0.0 <= config.bn_momentum < 1.0:
    raise ValueError(f'{where}.bn_momentum={config.bn_momentum!r}: expected a value in [0, 1) '
                     '(Flax convention: 0.9 = torch momentum 0.1)')


class ProjectionMLP(nn.Module):
  """`depth` Linears without bias; hidden ones followed by norm + activation (depth 0: identity).

  BatchNorm statistics live in the `batch_stats` collection: `train=True` normalises with the
  statistics of the batch (under jit, of the whole global batch) and updates the running ones;
  `train=False` normalises with the running ones. Output is float32.
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    cfg = self.config
    dtype = DTYPES[cfg.get('dtype', 'float32')]
    out_dim = cfg.out_dim or x.shape[-1]
    for i in range(cfg.depth):
      last = i == cfg.depth - 1
      x = nn.Dense(out_dim if last else cfg.mlp_dim, use_bias=False, dtype=dtype,
                   kernel_init=xavier, name=f'fc{i}')(x)
      if last:
        break
      if cfg.norm == 'batch':
        # float32 statistics even under bf16 (torch autocast keeps BatchNorm in fp32).
        x = nn.BatchNorm(use_running_average=not train, momentum=cfg.bn_momentum,
                         epsilon=cfg.bn_eps, dtype=jnp.float32, name=f'bn{i}')(x)
      x = nn.relu(x) if cfg.act == 'relu' else nn.gelu(x, approximate=False)
    return x.astype(jnp.float32)
