"""Projection heads on top of the encoder: the DINO head (Caron et al. 2021).

Parameter names follow DINO's `vision_transformer.DINOHead` (`mlp_0/2/4` ≙ `head.mlp.0/2/4`,
`last_layer_weight_v/_g` ≙ `head.last_layer.weight_v/_g`) so conversion is a transpose per
tensor.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# DINO's `trunc_normal_(std=.02)` truncates at ±2 absolute (±100σ), i.e. a plain normal.
dino_normal = nn.initializers.normal(0.02)


def default_dino_head_config() -> ml_collections.ConfigDict:
  """config.dino.head with DINO's defaults (`main_dino.py`)."""
  return ml_collections.ConfigDict({
      'out_dim': 65536,
      'hidden_dim': 2048,
      'bottleneck_dim': 256,
      'nlayers': 3,
      'norm_last_layer': True,   # weight_g frozen at 1 (README: False is better for ViT-S)
  })


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """torch `F.normalize(x, dim=-1, p=2)`: x / max(‖x‖₂, eps)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


def _torch_linear_uniform(key, shape, dtype=jnp.float32):
  """PyTorch's default Linear weight init U(±1/√fan_in) on a Flax (in, out) kernel."""
  bound = 1.0 / np.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class DINOHead(nn.Module):
  """MLP (GELU, `nlayers` Linears, last one to the bottleneck) → L2-normalise → weight-normed
  Linear without bias: W = g·v/‖v‖ with the norm of each output unit's weight vector.

  With `norm_last_layer` (DINO's default) g is the constant 1 and not a parameter; otherwise
  `weight_g` (1, out_dim) starts at 1 and is trained (and, being 2-D, weight-decayed as in
  DINO, where its torch shape is (out_dim, 1)).
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    if cfg.nlayers < 1:
      raise ValueError(f'config.dino.head.nlayers={cfg.nlayers}: expected >= 1')
    dense = lambda f, i: nn.Dense(f, kernel_init=dino_normal, bias_init=nn.initializers.zeros,
                                  name=f'mlp_{2 * i}')
    if cfg.nlayers == 1:
      x = dense(cfg.bottleneck_dim, 0)(x)
    else:
      for i in range(cfg.nlayers - 1):
        x = nn.gelu(dense(cfg.hidden_dim, i)(x), approximate=False)
      x = dense(cfg.bottleneck_dim, cfg.nlayers - 1)(x)
    x = l2_normalize(x.astype(jnp.float32))
    # `weight_v` keeps PyTorch's default Linear init: DINO creates it after its custom init ran.
    v = self.param('last_layer_weight_v', _torch_linear_uniform, (cfg.bottleneck_dim, cfg.out_dim))
    w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
    if not cfg.norm_last_layer:
      w = w * self.param('last_layer_weight_g', nn.initializers.ones, (1, cfg.out_dim))
    return x @ w
