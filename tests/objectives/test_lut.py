"""LUT objective: reduction to MAE, L_BC by hand, official view-2 masking, EMA target, config."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import lut as lut_config
from mimjax import masking
from mimjax import optim
from mimjax.objectives import lut, mae
from mimjax.train import trainer


def _config(small=True, **overrides):
  """The tiny config; `small` shrinks it further (1 block, 16-px images) for unit tests."""
  config = lut_config.get_config('tiny')
  if small:
    config.model.depth = 1
    config.model.image_size = 16
  config.update_from_flattened_dict(overrides)  # keys may be dotted: 'lut.alpha'
  return config


def _batch(b=8, seed=0, size=16):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (b, 2, size, size, 3), dtype=np.uint8)}


@pytest.fixture(scope='module')
def tiny():
  """(objective, batch, params, state) of the small code-variant config, initialised once."""
  objective = lut.make(_config())
  batch = _batch()
  params, state = jax.jit(objective.init)(jax.random.key(0), batch)
  return objective, batch, params, state


@pytest.fixture(scope='module')
def tiny_loss(tiny):
  """state → ((loss, (new_state, metrics)), (d/dparams, d/dstate)) of `tiny` with rng key 3 at
  step 0: one jit compilation shared by several tests."""
  objective, batch, params, _ = tiny
  fn = lambda p, s: objective.loss(p, s, batch, jax.random.key(3), 0)
  return jax.jit(lambda s: jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(params, s))


def _np_cos_distance(p, z):
  p = p / np.linalg.norm(p, axis=-1, keepdims=True)
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  return 2 - 2 * (p * z).sum(-1)


def test_alpha_zero_equals_mae_exactly(tiny):
  """Same params, rng and reconstruction view: LUT with α = 0 gives MAE's loss bit for bit."""
  _, batch, params, state = tiny
  config = _config(**{'lut.alpha': 0.0, 'model.drop_path': 0.2})  # drop path: same rng use too
  rng = jax.random.key(7)
  value, (_, metrics) = jax.jit(lut.make(config).loss)(params, state, batch, rng, 0)
  mae_params = {'encoder': params['encoder'], 'decoder': params['decoder']}
  want, _ = jax.jit(mae.make(config).loss)(mae_params, {}, {'image': batch['image'][:, 0]}, rng, 0)
  assert float(metrics['bc_loss']) > 0.01  # the BC term is live, just weighted by 0
  assert float(value) == float(want)
  assert float(metrics['mae_loss']) == float(want)


def test_cosine_distance_hand_examples():
  x = jnp.array([[1.0, 2.0, -3.0], [0.5, 0.0, 4.0]])
  np.testing.assert_allclose(lut.cosine_distance(x, x), [0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(lut.cosine_distance(x, 3.0 * x), [0.0, 0.0], atol=1e-6)  # scale-free
  p = jnp.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
  z = jnp.array([[1.0, 1.0], [0.0, -5.0], [-1.0, 0.0]])
  # cos = 1/√2, 0, −1  →  2 − √2, 2, 4
  np.testing.assert_allclose(lut.cosine_distance(p, z), [2 - math.sqrt(2), 2.0, 4.0], rtol=1e-6)


def test_bc_loss_averages_the_cross_view_pairs():
  rng = np.random.default_rng(0)
  a, b, c, d = (rng.normal(size=(5, 6)).astype(np.float32) for _ in range(4))
  j = jnp.asarray
  # Code (engine_lut.py): pairs (online 1, target 0) and (online 0, target 1), batch means.
  got = lut.bc_loss({0: j(a), 1: j(b)}, {0: j(c), 1: j(d)})
  want = (_np_cos_distance(a, d).mean() + _np_cos_distance(b, c).mean()) / 2
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Paper: the reconstruction view online vs the other view's target.
  got = lut.bc_loss({0: j(a)}, {1: j(d)})
  np.testing.assert_allclose(float(got), _np_cos_distance(a, d).mean(), rtol=1e-5)
  with pytest.raises(ValueError, match='no \\(online, target\\) pair'):
    lut.bc_loss({0: j(a)}, {0: j(c)})


def test_second_view_visible_ids_match_official_random_masking():
  """models_lut.py random_masking: one noise draw, view 2 keeps ids_shuffle[:, keep:2·keep]."""
  noise = np.random.default_rng(1).random((4, 64)).astype(np.float32)
  ids_shuffle = torch.argsort(torch.from_numpy(noise), dim=1)
  keep = int(64 * (1 - 0.75))
  ids_restore = torch.argsort(ids_shuffle, dim=1)
  mask2 = torch.ones(4, 64)
  mask2[:, keep:2 * keep] = 0
  mask2 = torch.gather(mask2, 1, ids_restore)

  ours = np.asarray(lut.second_visible_ids(jnp.asarray(noise), 0.75))
  np.testing.assert_array_equal(ours, ids_shuffle[:, keep:2 * keep].numpy())
  visible2 = np.zeros((4, 64))
  np.put_along_axis(visible2, ours, 1.0, axis=1)
  np.testing.assert_array_equal(visible2, 1 - mask2.numpy())
  first = np.asarray(masking.random_masking_from_noise(jnp.asarray(noise), 0.75).keep_ids)
  for i in range(4):
    assert not set(first[i]) & set(ours[i])  # disjoint visible sets


def test_after_update_is_the_ema_of_encoder_projector_and_bn_stats(tiny):
  config = _config()
  objective, _, params, state = tiny
  # A distinct online model and online BN statistics.
  online = jax.tree.map(lambda x: x + 1.0, params)
  stats = jax.tree.map(lambda x: 2.0 * x + 0.5, state['batch_stats'])
  target = {**state['target'], 'batch_stats': jax.tree.map(lambda x: x + 0.3,
                                                           state['target']['batch_stats'])}
  state = {**state, 'batch_stats': stats, 'target': target}
  step, total = 37, config.total_steps
  m = 1 + 0.5 * (config.lut.momentum - 1) * (1 + math.cos(math.pi * step / total))  # DINO cosine
  new = objective.after_update(online, state, step)
  old = state['target']
  assert set(new['target']['params']) == {'encoder', 'projector'}
  assert set(new['target']['batch_stats']) == {'projector'}
  want = jax.tree.map(lambda t, o: m * np.asarray(t) + (1 - m) * np.asarray(o), old['params'],
                      {'encoder': online['encoder'], 'projector': online['projector']})
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7),
               new['target']['params'], want)
  for name in ('mean', 'var'):
    np.testing.assert_allclose(new['target']['batch_stats']['projector']['bn0'][name],
                               m * old['batch_stats']['projector']['bn0'][name]
                               + (1 - m) * stats['projector']['bn0'][name], rtol=1e-5)
  assert new['batch_stats'] is stats  # online statistics are the loss's business
  # Initially the target is a copy of the online encoder and projector.
  np.testing.assert_array_equal(old['params']['encoder']['patch_embed']['proj']['kernel'],
                                params['encoder']['patch_embed']['proj']['kernel'])


def test_target_gets_no_gradient_and_loss_leaves_it_alone(tiny, tiny_loss):
  state = tiny[3]
  (_, (new_state, _)), (g_params, g_state) = tiny_loss(state)
  for leaf in jax.tree.leaves(g_state):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  for name in ('encoder', 'decoder', 'projector', 'predictor'):
    assert float(optax_norm(g_params[name])) > 0, name
  # The loss updates the online BN statistics but never the target.
  jax.tree.map(np.testing.assert_array_equal, new_state['target'], state['target'])
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_state['batch_stats'],
                       state['batch_stats'])
  assert min(jax.tree.leaves(moved)) > 0


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _shift_target_stats(state, delta=3.0):
  stats = jax.tree.map(lambda x: x + delta, state['target']['batch_stats'])
  return {**state, 'target': {**state['target'], 'batch_stats': stats}}


def test_code_target_bn_uses_its_ema_running_statistics(tiny, tiny_loss):
  """'running' (code: target in eval mode) normalises with the target's EMA statistics."""
  state = tiny[3]
  bc = lambda s: float(tiny_loss(s)[0][1][1]['bc_loss'])
  assert abs(bc(state) - bc(_shift_target_stats(state))) > 1e-4


def test_paper_variant_one_pair_batch_stats_same_reconstruction(tiny, tiny_loss):
  """Paper: one pair (view 0 online, view 1 target); target BN on batch statistics."""
  _, batch, params, state = tiny
  paper = jax.jit(lambda s: lut.make(_config(**{
      'lut.symmetric': False, 'lut.target_bn_stats': 'batch'})).loss(
          params, s, batch, jax.random.key(3), 0)[1][1])
  m_code, m_paper = tiny_loss(state)[0][1][1], paper(state)
  # Same reconstruction path (to float rounding: the code side is compiled with its gradient).
  np.testing.assert_allclose(float(m_paper['mae_loss']), float(m_code['mae_loss']), rtol=1e-6)
  assert abs(float(m_paper['bc_loss']) - float(m_code['bc_loss'])) > 1e-4
  # Batch statistics: the target's running statistics are not read.
  assert float(paper(_shift_target_stats(state))['bc_loss']) == float(m_paper['bc_loss'])
  # No second visible set, so mask ratios below 0.5 are fine.
  lut.make(_config(**{'lut.symmetric': False, 'mask_ratio': 0.3}))


@pytest.mark.parametrize('key,value,message', [
    ('lut.alpha', -1.0, 'config.lut.alpha'),
    ('lut.target_bn_stats', 'eval', 'config.lut.target_bn_stats'),
    ('lut.momentum', 1.5, 'config.lut.momentum'),
    ('mask_ratio', 0.3, 'config.mask_ratio'),
    ('data.augment', 'mae', 'config.data.augment'),
    ('masking', 'block', 'config.masking'),
    ('target', 'hog', 'config.target'),
    ('lut.projector.norm', 'layer', 'config.lut.projector.norm'),
])
def test_bad_config_is_one_clear_error(key, value, message):
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    lut.make(_config(**{key: value}))


def test_config_rows():
  s = lut_config.get_config('vit_s,in1k,1600ep')
  b = lut_config.get_config('vit_b,in1k,1600ep')
  b400 = lut_config.get_config('vit_b,in1k,400ep')
  assert (s.model.variant, s.lut.alpha) == ('S/16', 1.0)
  assert (b.model.variant, b.lut.alpha) == ('B/16', 0.25)
  assert (b.total_epochs, b400.total_epochs, b.warmup_epochs) == (1600, 400, 40)
  for c in (s, b, b400):
    assert (c.objective, c.data.augment, c.mask_ratio, c.norm_pix) == ('lut', 'lut', 0.75, True)
    assert (c.lut.projector.mlp_dim, c.lut.projector.norm, c.lut.projector.act) == (
        4096, 'batch', 'relu')
    assert (c.lut.momentum, c.lut.symmetric, c.lut.target_bn_stats) == (0.996, True, 'running')
    assert (c.batch_size, c.optim.b2, c.optim.weight_decay) == (4096, 0.95, 0.05)
  # √-batch scaling: equals the linear rule at 4096, differs elsewhere (REFERENCE §3).
  np.testing.assert_allclose(optim.peak_lr(b.optim, 4096), 1.5e-4 * 4096 / 256)
  np.testing.assert_allclose(optim.peak_lr(b.optim, 1024), 1.2e-3)
  p = lut_config.get_config('vit_b,in1k,1600ep,variant=paper')
  assert (p.lut.symmetric, p.lut.target_bn_stats, p.optim.b2, p.optim.lr_scaling) == (
      False, 'batch', 0.999, 'linear')
  with pytest.raises(ValueError, match='variant'):
    lut_config.get_config('vit_b,variant=both')


def test_tiny_config_trains_a_few_steps(tmp_path):
  config = _config(total_steps=2, log_every=1, checkpoint_every=2,
                   **{'mesh.devices': 1, 'data.image_size': 16, 'async_checkpoint': False})
  record = trainer.train_and_evaluate(config, str(tmp_path))
  assert record['step'] == 2
  for key in ('loss', 'mae_loss', 'bc_loss'):
    assert np.isfinite(record[key]), key
  assert 0 < record['bc_loss'] <= 4
  np.testing.assert_allclose(record['loss'], record['mae_loss'] + record['bc_loss'], rtol=1e-5)
