"""Optimizers and schedules: AdamW with MAE-style param groups, LARS/SGD (probes), layer-wise
lr decay (fine-tuning), warm-up + cosine lr."""

import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mimjax import ema as ema_lib
from mimjax.models import layout
from mimjax.tree import matches, path_name


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
                  min_value: float = 0.0,
                  warmup: str = 'linear') -> Callable[[jnp.ndarray], jnp.ndarray]:
  """MAE/DINO per-step schedule: linear 0 → peak over warm-up, then half-cycle cosine to min.

  warmup='linear' (MAE's adjust_learning_rate): peak·s/W, the peak is reached at step W.
  warmup='linspace' (DINO's cosine_scheduler, np.linspace(0, peak, W)): peak·s/(W − 1), the
  peak is reached at step W − 1 (step W starts the cosine at the peak as well)."""
  if warmup not in ('linear', 'linspace'):
    raise ValueError(f'config.optim.warmup={warmup!r}: expected "linear" (MAE) or "linspace" '
                     '(DINO)')
  ramp = warmup_steps if warmup == 'linear' else warmup_steps - 1

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(ramp, 1)
    frac = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    cos = min_value + (peak - min_value) * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(frac, 0, 1)))
    return jnp.where(step < warmup_steps, warm, cos)
  return schedule


def param_labels(params: Any, frozen_patterns) -> Any:
  """'frozen' for params matching `optim.frozen` (e.g. sincos pos-embeds), else 'train'."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: 'frozen' if matches(path_name(p), frozen_patterns) else 'train', params)


def decay_mask(params: Any, no_decay_patterns=()) -> Any:
  """timm `add_weight_decay`: no decay for ≤1-D tensors (per layer: a scanned stack's layer
  axis does not count), biases and `no_decay` patterns."""
  def decays(path, x):
    name = path_name(path)
    return bool(layout.per_layer_ndim(name, x.ndim) > 1 and not name.endswith('bias')
                and not matches(name, no_decay_patterns))
  return jax.tree_util.tree_map_with_path(decays, params)


class LarsState(NamedTuple):
  """Momentum buffer of `scale_by_lars`."""
  mu: Any


def scale_by_lars(weight_decay: float = 0.0, trust_coefficient: float = 0.001,
                  momentum: float = 0.9) -> optax.GradientTransformation:
  """MAE `util/lars.py` before the lr: >1-D tensors get g ← (g + wd·p)·η‖p‖/‖g + wd·p‖
  (factor 1 when either norm is 0); ≤1-D tensors keep g (no wd, no trust ratio); then
  mu ← momentum·mu + g is the update (no dampening, no Nesterov)."""
  def init(params):
    return LarsState(jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('scale_by_lars needs params (weight decay and trust ratio)')

    def adapt(g, p):
      if p.ndim <= 1:
        return g
      g = g + weight_decay * p
      p_norm, g_norm = jnp.linalg.norm(p), jnp.linalg.norm(g)
      q = jnp.where(p_norm > 0, jnp.where(g_norm > 0, trust_coefficient * p_norm / g_norm, 1.0),
                    1.0)
      return g * q

    grads = jax.tree.map(adapt, updates, params)
    mu = jax.tree.map(lambda m, g: momentum * m + g, state.mu, grads)
    return mu, LarsState(mu)

  return optax.GradientTransformation(init, update)


def lars(learning_rate, weight_decay: float = 0.0, trust_coefficient: float = 0.001,
         momentum: float = 0.9) -> optax.GradientTransformation:
  """MAE's LARS (linear probing): p ← p − lr·mu, mu from `scale_by_lars`."""
  return optax.chain(scale_by_lars(weight_decay, trust_coefficient, momentum),
                     optax.scale_by_learning_rate(learning_rate))


EMBEDDING_PARAMS = ('cls_token', 'reg_token', 'pos_embed', 'patch_embed')


def layer_id(name: str, num_layers: int) -> int:
  """MAE `get_layer_id_for_vit` on a '/'-joined param path: 0 for cls_token / pos_embed /
  patch_embed (and reg_token: extra prefix tokens such as SemanticMIM's proxies are one
  `cls_token` tensor in the official code), i + 1 for blocks_i, `num_layers` (= depth + 1)
  for everything else."""
  parts = name.split('/')
  if any(p in EMBEDDING_PARAMS for p in parts):
    return 0
  for p in parts:
    m = re.fullmatch(r'blocks_(\d+)', p)
    if m:
      return int(m.group(1)) + 1
  return num_layers


def layer_decay_scales(params: Any, decay: float) -> Any:
  """MAE `param_groups_lrd` lr scale per param: decay^(num_layers − layer_id), where
  num_layers = depth + 1 and depth = the number of `blocks_i` found in the params. A scanned
  stack's leaf gets one scale per layer, shaped (depth, 1, …) to broadcast against it."""
  scales = layout.unrolled_view(_unrolled_layer_decay_scales)(params, decay)
  return jax.tree.map(lambda s, p: s if jnp.ndim(s) == 0 else
                      jnp.reshape(s, jnp.shape(s) + (1,) * (p.ndim - 1)), scales, params)


def _unrolled_layer_decay_scales(params: Any, decay: float) -> Any:
  names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  ids = [int(m.group(1)) for n in names for m in [re.search(r'(?:^|/)blocks_(\d+)/', n)] if m]
  num_layers = (max(ids) + 1 if ids else 0) + 1
  return jax.tree_util.tree_map_with_path(
      lambda p, _: float(decay) ** (num_layers - layer_id(path_name(p), num_layers)), params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update by its fixed per-parameter factor (layer-wise lr decay)."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(
      lambda u, s: u * s, updates, scales))


# --------------------------------------------------------------- DINO's AdamW (optional keys)
class SkipState(NamedTuple):
  """State of `skip_until`: the global step count and the wrapped transformation's state."""
  count: jnp.ndarray
  inner: Any


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
  """DINO `utils.clip_gradients`: each tensor on its own, g ← g·c with c = max_norm/(‖g‖₂ +
  1e-6) when c < 1 (not the global norm)."""
  def clip(g):
    coef = max_norm / (jnp.linalg.norm(g.astype(jnp.float32)) + 1e-6)
    return (g * jnp.minimum(coef, 1.0)).astype(g.dtype)
  return optax.stateless(lambda updates, params=None: jax.tree.map(clip, updates))


def skip_until(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
  """Runs `inner` only from global step `steps` on; before, the update is zero and `inner`'s
  state (Adam moments and step count) is left untouched — what torch AdamW does for a param
  whose .grad is None (DINO's last-layer freeze). `inner`'s own count starts at 0 on step
  `steps`, so schedules inside it must be shifted by `steps` (as `dino_adamw` does)."""
  def init(params):
    return SkipState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    run = lambda: inner.update(updates, state.inner, params)
    skip = lambda: (jax.tree.map(jnp.zeros_like, updates), state.inner)
    new, inner_state = jax.lax.cond(state.count >= steps, run, skip)
    return new, SkipState(state.count + 1, inner_state)

  return optax.GradientTransformation(init, update)


DINO_KEYS = ('clip_per_tensor', 'weight_decay_end', 'freeze')


def uses_dino_adamw(config: ml_collections.ConfigDict) -> bool:
  """Whether `config.optim` sets any of DINO's optional AdamW keys."""
  return bool(config.get('clip_per_tensor') or config.get('freeze')
              or config.get('weight_decay_end') is not None)


def freeze_steps(config: ml_collections.ConfigDict, num_examples, batch_size: int) -> int:
  """`optim.freeze_steps`, or `optim.freeze_epochs` × (N // batch) (a drop-remainder epoch)."""
  if config.get('freeze_steps') is not None and config.get('freeze_epochs') is not None:
    raise ValueError('config.optim: set only one of freeze_steps / freeze_epochs')
  if config.get('freeze_steps') is not None:
    return int(config.freeze_steps)
  if config.get('freeze_epochs') is None:
    return 0
  if num_examples is None:
    raise ValueError('config.optim.freeze_epochs needs the data-set size: pass num_examples '
                     'to make_optimizer (or set config.optim.freeze_steps)')
  return int(round(config.freeze_epochs * (num_examples // batch_size)))


def dino_adamw(config: ml_collections.ConfigDict, params: Any, lr: Callable, *,
               total_steps: int, num_examples=None,
               batch_size: int = 1) -> optax.GradientTransformation:
  """AdamW as DINO's `main_dino.py` runs it, from `config.optim`:
  `clip_per_tensor` (3.0: per-tensor clip before Adam), `weight_decay` → `weight_decay_end`
  (per-step cosine, 0.04 → 0.4; only decayed params), and params matching the regexes
  `freeze` (e.g. 'last_layer') get no update, no decay and no moment/step update for the
  first `freeze_epochs` (or `freeze_steps`); afterwards they run their own AdamW whose
  bias correction starts at 1, with the global lr/wd schedules (torch semantics)."""
  for key in ('clip_norm', 'layer_decay'):
    if config.get(key) is not None:
      raise ValueError(f'config.optim.{key} cannot be combined with DINO keys {DINO_KEYS}')
  if config.name != 'adamw':
    raise ValueError(f'config.optim.name={config.name!r}: DINO keys {DINO_KEYS} need "adamw"')
  if config.get('weight_decay_end') is not None:
    base, end = float(config.weight_decay), float(config.weight_decay_end)
    wd = lambda step: ema_lib.cosine_schedule(base, end, step, total_steps)
  else:
    wd = lambda step: jnp.asarray(config.weight_decay, jnp.float32)
  mask = decay_mask(params, tuple(config.get('no_decay', ())))
  late_steps = freeze_steps(config, num_examples, batch_size)
  clip = config.get('clip_per_tensor')

  def adamw(shift: int) -> optax.GradientTransformation:
    chain = [clip_per_tensor(clip)] if clip else []
    chain += [optax.scale_by_adam(config.b1, config.b2, config.get('eps', 1e-8)),
              optax.add_decayed_weights(lambda c: wd(c + shift), mask),
              optax.scale_by_learning_rate(lambda c: lr(c + shift))]
    return optax.chain(*chain)

  frozen = tuple(config.get('frozen', ()))
  late = tuple(config.get('freeze', ()) or ()) if late_steps > 0 else ()

  def label(path, _):
    name = path_name(path)
    if matches(name, frozen):
      return 'frozen'
    return 'late' if late and matches(name, late) else 'train'

  return optax.multi_transform(
      {'train': adamw(0), 'late': skip_until(adamw(late_steps), late_steps),
       'frozen': optax.set_to_zero()},
      jax.tree_util.tree_map_with_path(label, params))


OPTIMIZERS = ('adamw', 'lars', 'sgd')


def make_optimizer(config: ml_collections.ConfigDict, params: Any, *, total_steps: int,
                   warmup_steps: int, batch_size: int, num_examples=None):
  """Returns (optax transformation, lr schedule) for `config.optim` (name: adamw/lars/sgd;
  optional `layer_decay` multiplies each param's lr by MAE's layer-wise factor; DINO's keys
  `clip_per_tensor`, `weight_decay_end`, `freeze` select `dino_adamw`; `num_examples` (the
  train-set size) converts `optim.freeze_epochs` to steps)."""
  if config.name not in OPTIMIZERS:
    raise ValueError(f'config.optim.name={config.name!r}: expected one of {OPTIMIZERS}')
  lr = warmup_cosine(peak_lr(config, batch_size), total_steps, warmup_steps,
                     config.get('min_lr', 0.0), config.get('warmup', 'linear'))
  if uses_dino_adamw(config):  # per-tensor clip / wd schedule / last-layer freeze (DINO)
    return dino_adamw(config, params, lr, total_steps=total_steps, num_examples=num_examples,
                      batch_size=batch_size), lr
  chain = []
  if config.get('clip_norm'):
    chain.append(optax.clip_by_global_norm(config.clip_norm))
  if config.name == 'adamw':
    chain.append(optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.get('eps', 1e-8),
                             weight_decay=config.weight_decay,
                             mask=decay_mask(params, tuple(config.get('no_decay', ())))))
  elif config.name == 'lars':  # MAE linear probe; its own ≤1-D exclusion, no decay mask
    chain.append(lars(lr, config.weight_decay, config.get('trust_coefficient', 0.001),
                      config.get('momentum', 0.9)))
  else:  # torch SGD: g += wd·p; buf = m·buf + g; p -= lr·buf
    chain.append(optax.add_decayed_weights(
        config.weight_decay, decay_mask(params, tuple(config.get('no_decay', ())))))
    chain.append(optax.sgd(lr, momentum=config.get('momentum', 0.9) or None))
  tx = optax.multi_transform(
      {'train': optax.chain(*chain), 'frozen': optax.set_to_zero()},
      param_labels(params, tuple(config.get('frozen', ()))))
  if config.get('layer_decay') is not None:
    decay = config.layer_decay
    if not 0 < decay <= 1:
      raise ValueError(f'config.optim.layer_decay={decay}: expected a value in (0, 1]')
    tx = optax.chain(tx, scale_by_tree(layer_decay_scales(params, decay)))
  return tx, lr
