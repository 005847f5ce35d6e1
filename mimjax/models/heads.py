"""Projection heads on top of the encoder: the DINO head (Caron et al. 2021).

Parameter names follow DINO's `vision_transformer.DINOHead` (`mlp_0/2/4` ≙ `head.mlp.0/2/4`,
with `use_bn` `mlp_0/1/3/4/6` ≙ Linear/BatchNorm1d/Linear/BatchNorm1d/Linear at the torch
Sequential's indices; `last_layer_weight_v/_g` ≙ `head.last_layer.weight_v/_g`) so conversion
is a transpose per tensor.
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
      'use_bn': False,           # --use_bn_in_head: BatchNorm1d after each hidden Linear
  })


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """torch `F.normalize(x, dim=-1, p=2)`: x / max(‖x‖₂, eps)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


def _torch_linear_uniform(key, shape, dtype=jnp.float32):
  """PyTorch's default Linear weight init U(±1/√fan_in) on a Flax (in, out) kernel."""
  bound = 1.0 / np.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class TorchBatchNorm1d(nn.Module):
  """torch `BatchNorm1d` (eps 1e-5, momentum 0.1, affine): train mode normalises with the batch
  mean and biased variance and moves the running mean and *unbiased* running variance (flax's
  `nn.BatchNorm` keeps the biased one); eval mode normalises with the running statistics.

  Statistics are over axis 0 of the global batch (SyncBatchNorm under jit, see
  mimjax/models/batchnorm.py) and in float32."""
  epsilon: float = 1e-5
  momentum: float = 0.1   # torch's: running ← (1 − momentum)·running + momentum·batch

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    features = x.shape[-1]
    x = x.astype(jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    if train:
      mean = jnp.mean(x, axis=0)
      var = jnp.mean(jnp.square(x - mean), axis=0)   # two-pass: no E[x²] − E[x]² cancellation
      if not self.is_initializing():
        n = x.shape[0]
        unbiased = var * n / max(n - 1, 1)
        running_mean.value = ((1 - self.momentum) * running_mean.value
                              + self.momentum * jax.lax.stop_gradient(mean))
        running_var.value = ((1 - self.momentum) * running_var.value
                             + self.momentum * jax.lax.stop_gradient(unbiased))
    else:
      mean, var = running_mean.value, running_var.value
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class DINOHead(nn.Module):
  """MLP (GELU, `nlayers` Linears, last one to the bottleneck) → L2-normalise → weight-normed
  Linear without bias: W = g·v/‖v‖ with the norm of each output unit's weight vector.

  With `norm_last_layer` (DINO's default) g is the constant 1 and not a parameter; otherwise
  `weight_g` (1, out_dim) starts at 1 and is trained (and, being 2-D, weight-decayed as in
  DINO, where its torch shape is (out_dim, 1)).

  With `use_bn` (DINO's `--use_bn_in_head`) a `TorchBatchNorm1d` follows each hidden Linear
  (before the GELU); `train` picks batch statistics (and updates the running ones, collection
  `batch_stats`) over the running ones. Without it `train` changes nothing.
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    cfg = self.config
    if cfg.nlayers < 1:
      raise ValueError(f'config.dino.head.nlayers={cfg.nlayers}: expected >= 1')
    use_bn = cfg.get('use_bn', False)
    # Index of each module in DINO's nn.Sequential: Linear[, BatchNorm1d], GELU per hidden layer.
    stride = 3 if use_bn else 2
    dense = lambda f, i: nn.Dense(f, kernel_init=dino_normal, bias_init=nn.initializers.zeros,
                                  name=f'mlp_{stride * i}')
    if cfg.nlayers == 1:
      x = dense(cfg.bottleneck_dim, 0)(x)
    else:
      for i in range(cfg.nlayers - 1):
        x = dense(cfg.hidden_dim, i)(x)
        if use_bn:
          x = TorchBatchNorm1d(name=f'mlp_{stride * i + 1}')(x, train=train)
        x = nn.gelu(x, approximate=False)
      x = dense(cfg.bottleneck_dim, cfg.nlayers - 1)(x)
    x = l2_normalize(x.astype(jnp.float32))
    # `weight_v` keeps PyTorch's default Linear init: DINO creates it after its custom init ran.
    v = self.param('last_layer_weight_v', _torch_linear_uniform, (cfg.bottleneck_dim, cfg.out_dim))
    w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
    if not cfg.norm_last_layer:
      w = w * self.param('last_layer_weight_g', nn.initializers.ones, (1, cfg.out_dim))
    return x @ w
