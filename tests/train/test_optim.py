"""Optimizer param groups and schedules vs the MAE recipe (hand computations)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mimjax import optim
from mimjax.durations import resolve_steps


def _params():
  return {'encoder': {'cls_token': jnp.ones((1, 1, 4)), 'pos_embed': jnp.ones((1, 5, 4)),
                      'blocks_0': {'attn': {'qkv': {'kernel': jnp.ones((4, 12)), 'bias': jnp.ones(12)}},
                                   'norm1': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}}},
          'decoder': {'mask_token': jnp.ones((1, 1, 4))}}


def test_decay_mask_follows_timm_add_weight_decay():
  mask = optim.decay_mask(_params())
  enc = mask['encoder']
  assert enc['cls_token'] and enc['pos_embed'] and mask['decoder']['mask_token']  # 3-D decay
  assert enc['blocks_0']['attn']['qkv']['kernel']
  assert not enc['blocks_0']['attn']['qkv']['bias']
  assert not enc['blocks_0']['norm1']['scale'] and not enc['blocks_0']['norm1']['bias']
  mask = optim.decay_mask(_params(), ('cls_token',))
  assert not mask['encoder']['cls_token']


def test_schedule_matches_mae_formula():
  peak, total, warm = 2.4e-3, 100, 10
  sched = optim.warmup_cosine(peak, total, warm)
  for step in (0, 5, 10, 37, 99):
    if step < warm:
      ref = peak * step / warm
    else:
      ref = peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
    np.testing.assert_allclose(float(sched(step)), ref, rtol=1e-5, atol=peak * 1e-7)


@pytest.mark.parametrize('warm', [1, 2, 10])
def test_linspace_warmup_matches_dino_cosine_scheduler(warm):
  """DINO's utils.cosine_scheduler (np.linspace warm-up reaching the peak at step W − 1)."""
  from tests.objectives.dino_torch_ref import cosine_scheduler
  peak, final, total = 5e-4, 1e-6, 60
  ref = cosine_scheduler(peak, final, total, 1, warmup_epochs=warm)
  sched = optim.warmup_cosine(peak, total, warm, final, warmup='linspace')
  ours = np.array([float(sched(s)) for s in range(total)])
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=peak * 1e-7)
  with pytest.raises(ValueError, match='config.optim.warmup'):
    optim.warmup_cosine(peak, total, warm, warmup='cosine')


def test_peak_lr_scaling_rules():
  cfg = ml_collections.ConfigDict({'lr': None, 'base_lr': 1.5e-4, 'lr_scaling': 'linear'})
  assert optim.peak_lr(cfg, 4096) == pytest.approx(2.4e-3)
  cfg.lr_scaling = 'sqrt'
  assert optim.peak_lr(cfg, 4096) == pytest.approx(2.4e-3)  # equal at 4096 (LUT)
  assert optim.peak_lr(cfg, 1024) == pytest.approx(1.2e-3)
  cfg.lr = 0.1
  assert optim.peak_lr(cfg, 4096) == 0.1


def test_frozen_params_do_not_move_and_adamw_step_is_exact():
  params = _params()
  cfg = ml_collections.ConfigDict({'name': 'adamw', 'lr': 0.1, 'min_lr': 0.0, 'b1': 0.9,
                                   'b2': 0.95, 'eps': 1e-8, 'weight_decay': 0.05,
                                   'frozen': ('pos_embed$',), 'no_decay': ()})
  tx, _ = optim.make_optimizer(cfg, params, total_steps=10, warmup_steps=0, batch_size=256)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  np.testing.assert_array_equal(new['encoder']['pos_embed'], params['encoder']['pos_embed'])
  # First AdamW step: m̂ = g, v̂ = g² → update −lr·(g/(|g|+eps) + wd·p) for decayed tensors.
  np.testing.assert_allclose(new['encoder']['cls_token'], 1 - 0.1 * (1 + 0.05), rtol=1e-6)
  np.testing.assert_allclose(new['encoder']['blocks_0']['attn']['qkv']['bias'], 1 - 0.1, rtol=1e-6)


def test_resolve_steps():
  c = ml_collections.ConfigDict({'batch_size': 100, 'total_steps': None, 'total_epochs': 3,
                                 'total_examples': None})
  assert resolve_steps('total', c, 1000) == 30
  c.total_steps = 5
  with pytest.raises(ValueError, match='only one'):
    resolve_steps('total', c, 1000)
  assert resolve_steps('warmup', c, 1000, default=0) == 0


def test_resolve_steps_epochs_follow_the_drop_last_loader():
  # Official MAE/DINO: iterations = epochs · len(DataLoader(drop_last=True)) = epochs · (N // B);
  # 1281167 // 4096 = 312 (not 1281167 / 4096 = 312.78), so 1600 epochs are 499200 steps.
  c = ml_collections.ConfigDict({'batch_size': 4096, 'total_steps': None, 'total_epochs': 1600,
                                 'total_examples': None, 'warmup_steps': None,
                                 'warmup_epochs': 40.0, 'warmup_examples': None})
  assert resolve_steps('total', c, 1281167) == 1600 * 312
  assert resolve_steps('warmup', c, 1281167) == 40 * 312
  c.warmup_epochs = 0.5                         # fractional epochs: rounded after the floor
  assert resolve_steps('warmup', c, 1281167) == 156
  c.batch_size = 2000
  with pytest.raises(ValueError, match='total_epochs.*exceeds the 1000 training examples'):
    resolve_steps('total', c, 1000)


def test_cli_duration_override_unsets_the_other_units():
  from configs import mae as mae_config
  from mimjax.durations import apply_cli_overrides
  config = mae_config.get_config('vit_b,in1k,1600ep')
  config.total_steps = 10
  apply_cli_overrides(config, ['--config.total_steps=10', '--config.warmup_epochs=1'])
  assert config.total_epochs is None and config.total_steps == 10
  assert resolve_steps('total', config, 1000) == 10
  config.batch_size = 100
  assert resolve_steps('warmup', config, 1000) == 400  # warmup_epochs untouched (40)


def test_adam_step_bound_of_the_trained_params_helper_holds_and_is_attained():
  """tests/trained.py holds the key bias (exactly zero gradient) to adam_step_bound: optax's Adam
  stays under it for gradients of any scale, and the Cauchy–Schwarz history reaches it."""
  import optax
  from tests.trained import adam_step_bound
  b1, b2, steps = 0.9, 0.95, 8
  tx = optax.scale_by_adam(b1, b2, eps=0.0)
  rng = np.random.default_rng(0)
  grads = rng.standard_normal((steps, 4096)) * np.exp(rng.uniform(-20, 5, (steps, 4096)))
  update = jax.jit(tx.update)
  state = tx.init(jnp.zeros(4096))
  for t in range(steps):
    u, state = update(jnp.asarray(grads[t], jnp.float32), state)
    assert float(jnp.abs(u).max()) <= adam_step_bound(b1, b2, t + 1) * (1 + 1e-5)  # f32 eps
  # Equality: g at step s ∝ (b1/b2)^(T−s), the last step's update is the bound itself.
  state = tx.init(jnp.zeros(1))
  for s in range(1, steps + 1):
    u, state = update(jnp.full(1, (b1 / b2) ** (steps - s), jnp.float32), state)
  np.testing.assert_allclose(float(u[0]), adam_step_bound(b1, b2, steps), rtol=1e-5)
  assert adam_step_bound(b1, b2, 1) == 1.0   # the first step is g/|g|
