"""Optimizers and schedules: AdamW with MAE-style param groups, warm-up + cosine lr."""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mimjax.train.sharding import matches, path_name


def peak_lr(config: ml_collections.ConfigDict, batch_size: int) -> float:
  """`optim.lr` if set, else base_lr × batch/256 (linear, MAE) or × √batch / 4 (sqrt, LUT)."""
  if config.get('lr') is not None:
    return float(config.lr)
  scaling = config.get('lr_scaling', 'linear')
  if scaling == 'linear':
    return config.base_lr * batch_size / 256
  if scaling == 'sqrt':
    return config.base_lr * math.sqrt(batch_size) / 4
  raise ValueError(f'config.optim.lr_scaling={scaling!r}: expected "linear" or "sqrt"')


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int,
                  min_value: float = 0.0) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """MAE/DINO per-step schedule: linear 0 → peak over warm-up, then half-cycle cosine to min."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup_steps, 1)
    frac = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    cos = min_value + (peak - min_value) * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(frac, 0, 1)))
    return jnp.where(step < warmup_steps, warm, cos)
  return schedule


def param_labels(params: Any, frozen_patterns) -> Any:
  """'frozen' for params matching `optim.frozen` (e.g. sincos pos-embeds), else 'train'."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: 'frozen' if matches(path_name(p), frozen_patterns) else 'train', params)


def decay_mask(params: Any, no_decay_patterns=()) -> Any:
  """timm `add_weight_decay`: no decay for ≤1-D tensors, biases and `no_decay` patterns."""
  def decays(path, x):
    name = path_name(path)
    return bool(x.ndim > 1 and not name.endswith('bias') and not matches(name, no_decay_patterns))
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict, params: Any, *, total_steps: int,
                   warmup_steps: int, batch_size: int):
  """Returns (optax transformation, lr schedule) for `config.optim` (name: adamw)."""
  if config.name != 'adamw':
    raise ValueError(f'config.optim.name={config.name!r}: expected "adamw"')
  lr = warmup_cosine(peak_lr(config, batch_size), total_steps, warmup_steps,
                     config.get('min_lr', 0.0))
  chain = []
  if config.get('clip_norm'):
    chain.append(optax.clip_by_global_norm(config.clip_norm))
  chain.append(optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.get('eps', 1e-8),
                           weight_decay=config.weight_decay,
                           mask=decay_mask(params, tuple(config.get('no_decay', ())))))
  tx = optax.multi_transform(
      {'train': optax.chain(*chain), 'frozen': optax.set_to_zero()},
      param_labels(params, tuple(config.get('frozen', ()))))
  return tx, lr
