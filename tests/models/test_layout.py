"""Scanned blocks (model.scan_layers): the layout helpers, and the same step as unrolled blocks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import mae as mae_config
from configs import mre_mae as mre_mae_config
from mimjax import optim
from mimjax.models import layout
from mimjax.models.proxy import ProxyViT
from mimjax.models.vit import ViT, drop_path, drop_path_rates
from mimjax.objectives import mae

EPS = float(jnp.finfo(jnp.float32).eps)


def _tree(depth=3):
  rng = np.random.default_rng(0)
  block = lambda: {'attn': {'qkv': {'kernel': rng.normal(size=(4, 12)).astype(np.float32)}},
                   'norm1': {'scale': rng.normal(size=(4,)).astype(np.float32)}}
  return {'encoder': {**{f'blocks_{i}': block() for i in range(depth)},
                      'norm': {'scale': np.ones(4, np.float32)}},
          'decoder': {f'blocks_{i}': block() for i in range(2)}}


def test_stack_and_unstack_are_inverse_on_params_and_optimizer_state():
  params = jax.tree.map(jnp.asarray, _tree())
  stacked = layout.stack_blocks(params)
  assert stacked['encoder']['blocks']['attn']['qkv']['kernel'].shape == (3, 4, 12)
  assert stacked['decoder']['blocks']['norm1']['scale'].shape == (2, 4)
  np.testing.assert_array_equal(stacked['encoder']['blocks']['norm1']['scale'][1],
                                params['encoder']['blocks_1']['norm1']['scale'])
  assert layout.is_scanned(stacked) and not layout.is_scanned(params)
  assert jax.tree.all(jax.tree.map(np.array_equal, layout.unstack_blocks(stacked), params))
  # An optax state (named tuples around param-shaped trees) converts the same way.
  state = optax.adamw(1e-3).init(params)
  want = optax.adamw(1e-3).init(stacked)
  got = layout.stack_blocks(state)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert jax.tree.structure(layout.unstack_blocks(got)) == jax.tree.structure(state)
  # Already in the asked layout: unchanged; abstract shapes convert too.
  assert layout.to_layout(stacked, True) is not None
  assert jax.tree.structure(layout.to_layout(stacked, True)) == jax.tree.structure(stacked)
  abstract = layout.stack_blocks(jax.eval_shape(lambda: params))
  assert abstract['encoder']['blocks']['attn']['qkv']['kernel'].shape == (3, 4, 12)


def test_stack_rejects_missing_layers():
  params = _tree()
  del params['encoder']['blocks_1']
  with pytest.raises(ValueError, match=r'blocks_i params are not layers 0..1 \(found \[0, 2\]'):
    layout.stack_blocks(params)


def _batch(config, n=4):
  rng = np.random.default_rng(0)
  size = config.model.image_size
  batch = {'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)}
  if config.model.segment_bias.enabled:
    patches = (size // 4) ** 2
    batch['segment_ids'] = rng.integers(0, 4, (n, patches), dtype=np.uint8)
  return batch


def _value_and_grad(config, params, batch):
  obj = mae.make(config)
  return jax.jit(jax.value_and_grad(obj.loss, has_aux=True), static_argnums=4)(
      params, {}, batch, jax.random.key(1), 0)


@pytest.mark.parametrize('config_module', [mae_config, mre_mae_config], ids=['mae', 'mre_mae'])
def test_scanned_step_equals_unrolled_step(config_module):
  """Loss and gradients of the tiny MAE / MRE-MAE step are the unrolled step's, with drop path
  on (the per-block rates and keys are the same in both layouts) and remat in the scan."""
  config = config_module.get_config('tiny')
  config.model.drop_path = 0.2
  if config.model.segment_bias.enabled:  # nonzero u, so the bias changes the logits
    config.model.segment_bias.update(init_pos=0.5, init_neg=-0.3)
  batch = _batch(config)
  params, _ = jax.jit(mae.make(config).init)(jax.random.key(0), batch)
  (loss, _), grads = _value_and_grad(config, params, batch)
  scanned = ml_collections.ConfigDict(config.to_dict())
  scanned.model.update(scan_layers=True, remat=True)
  (loss_s, _), grads_s = _value_and_grad(scanned, layout.stack_blocks(params), batch)
  # Same operations in the same order; a float32 rounding per reduction (widths ≤ 256) at most.
  tol = EPS * 256
  np.testing.assert_allclose(loss_s, loss, rtol=tol)
  grads_s = layout.unstack_blocks(grads_s)
  assert jax.tree.structure(grads_s) == jax.tree.structure(grads)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    got = dict(jax.tree_util.tree_flatten_with_path(grads_s)[0])[path]
    scale = float(jnp.abs(g).max()) or 1.0
    np.testing.assert_allclose(got, g, rtol=0, atol=tol * scale, err_msg=jax.tree_util.keystr(path))
  if config.model.segment_bias.enabled:  # per-layer u rows got their own gradients
    assert float(jnp.abs(grads['encoder']['segment_bias']['u_pos']).min()) > 0


def test_drop_path_takes_a_traced_rate_and_each_layer_gets_its_own():
  # The explicit keep mask works with the rate as a scan input (a tracer): a fraction `rate` of
  # samples is zeroed (within 4σ of the binomial), the others scaled by 1/(1 − rate).
  n, rate = 10000, 0.3
  out = np.asarray(jax.jit(drop_path)(jnp.ones((n, 2, 3)), rate, jax.random.key(0)))
  zero = (out == 0).all(axis=(1, 2))
  assert abs(zero.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
  np.testing.assert_allclose(out[~zero], 1 / (1 - rate), rtol=EPS)
  np.testing.assert_allclose(drop_path_rates(3, 0.5), [0.0, 0.25, 0.5])
  # In a scanned stack block 0 (rate 0) is the eval block; block 1 (rate 0.5) is not.
  config = mae_config.get_config('tiny')
  config.model.update(drop_path=0.5, scan_layers=True)
  model = ViT(config.model)
  images = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(1), images)
  run = jax.jit(lambda train: model.apply(params, images, train=train, return_layers=True,
                                          rngs={'dropout': jax.random.key(2)})[1]['layers'],
                static_argnums=0)
  train, evaluation = run(True), run(False)
  np.testing.assert_array_equal(train[0], evaluation[0])
  assert not np.allclose(train[1], evaluation[1])


def test_scanned_proxy_vit_equals_unrolled():
  """SemanticMIM's [MASK] stream (`extra_layers`) scans with the encoder: same outputs and
  per-layer lists."""
  cfg = ml_collections.ConfigDict({'variant': 'mu/4', 'image_size': 16, 'num_prefix_tokens': 3,
                                   'pos_embed': 'learned'})
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  keep, mask_ids = jnp.tile(jnp.arange(8)[None], (2, 1)), jnp.tile(jnp.arange(8, 16)[None], (2, 1))
  model = ProxyViT(cfg)
  params = jax.jit(model.init)(jax.random.key(1), images, keep, mask_ids)
  run = lambda m, p: jax.jit(lambda p: m.apply(p, images, keep, mask_ids, return_layers=True,
                                               return_attention=True))(p)
  tokens, aux = run(model, params)
  cfg_s = ml_collections.ConfigDict(cfg.to_dict())
  cfg_s.scan_layers = True
  stacked = layout.stack_blocks(params)
  assert stacked['params']['extra_layers']['attn']['q']['kernel'].shape == (2, 64, 64)
  tokens_s, aux_s = run(ProxyViT(cfg_s), stacked)
  np.testing.assert_allclose(tokens_s, tokens, atol=EPS * 64 * 10)
  for key in ('layers', 'mask_layers', 'attention', 'cross_attention', 'mask_tokens'):
    np.testing.assert_allclose(np.stack(aux_s[key]), np.stack(aux[key]), atol=EPS * 64 * 10,
                               err_msg=key)


def test_optimizer_masks_and_layer_decay_follow_the_layer_not_the_stack():
  params = jax.tree.map(jnp.asarray, _tree())['encoder']
  stacked = layout.stack_blocks(params)
  # A LayerNorm scale is 1-D per layer: no weight decay in either layout.
  assert not optim.decay_mask(stacked)['blocks']['norm1']['scale']
  assert optim.decay_mask(stacked)['blocks']['attn']['qkv']['kernel']
  scales = optim.layer_decay_scales(params, 0.5)
  scales_s = optim.layer_decay_scales(stacked, 0.5)
  np.testing.assert_allclose(scales_s['blocks']['attn']['qkv']['kernel'].ravel(),
                             [scales[f'blocks_{i}']['attn']['qkv']['kernel'] for i in range(3)])
  assert scales_s['blocks']['attn']['qkv']['kernel'].shape == (3, 1, 1)
  assert scales_s['norm']['scale'] == scales['norm']['scale']


def test_name_based_inits_find_the_layers_of_a_scanned_stack():
  """DINO's and BEiT's inits pick blocks by their `blocks_{i}` names: on stacked params they
  act per layer and return the stacked layout (BEiT: layer i's proj / fc2 std 0.02/√(2(i+1)))."""
  from mimjax.objectives import dino, semantic_mim
  layer = lambda: {'attn': {'proj': {'kernel': jnp.zeros((128, 128))}},
                   'mlp': {'fc2': {'kernel': jnp.zeros((128, 128))}}}
  stacked = layout.stack_blocks({f'blocks_{i}': layer() for i in range(2)})
  out = semantic_mim.official_init(stacked, jax.random.key(0), 'beit')
  assert layout.is_scanned(out)
  std = np.asarray(jnp.std(out['blocks']['attn']['proj']['kernel'], axis=(1, 2)))
  # 128² draws: the sample std is within ~1 % (4σ ≈ 2.5 %) of the true one.
  np.testing.assert_allclose(std, [0.02 / np.sqrt(2), 0.02 / np.sqrt(4)], rtol=0.03)
  out = dino.dino_init(stacked, jax.random.key(0))
  np.testing.assert_allclose(jnp.std(out['blocks']['mlp']['fc2']['kernel'], axis=(1, 2)),
                             [0.02, 0.02], rtol=0.03)
