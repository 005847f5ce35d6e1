"""MRE segment bias: values on a hand-made id grid, placement before 1/√d, gradients, modes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mimjax.models import segment_bias
from mimjax.models.vit import ViT


def _cfg(**kw):
  c = segment_bias.default_config()
  c.enabled = True
  c.update(kw)
  return c


def test_bias_values_on_hand_made_ids():
  # tokens: cls(0), seg 1, seg 1, seg 2, background 0
  ids = jnp.array([[0, 1, 1, 2, 0]])
  mod = segment_bias.SegmentBias(_cfg(init_pos=0.5, init_neg=-2.0), depth=2, num_heads=3)
  params = mod.init(jax.random.key(0), ids)
  bias = mod.apply(params, ids).layer(1).dense()
  assert bias.shape == (1, 3, 5, 5)
  p, n = 0.5, -2.0
  expected = np.array([[0, 0, 0, 0, 0],
                       [0, p, p, n, 0],
                       [0, p, p, n, 0],
                       [0, n, n, p, 0],
                       [0, 0, 0, 0, 0]], np.float32)
  for h in range(3):
    np.testing.assert_allclose(bias[0, h], expected)
  assert params['params']['u_pos'].shape == (2, 3)


@pytest.mark.parametrize('mode,shape', [('layer_head', (4, 2)), ('head', (1, 2)), ('shared', (1, 1))])
def test_mode_param_shapes(mode, shape):
  mod = segment_bias.SegmentBias(_cfg(mode=mode), depth=4, num_heads=2)
  params = mod.init(jax.random.key(0), jnp.array([[0, 1, 2]]))
  assert params['params']['u_pos'].shape == shape


def test_fixed_and_sign_variants():
  ids = jnp.array([[0, 1, 1, 2]])
  mod = segment_bias.SegmentBias(_cfg(mode='fixed'), depth=1, num_heads=1)
  assert 'params' not in mod.init(jax.random.key(0), ids)
  bias = mod.apply({}, ids).layer(0).dense()[0, 0]
  assert bias[1, 2] == 1.0 and bias[1, 3] == -1.0
  pos_only = segment_bias.SegmentBias(_cfg(mode='fixed', sign='positive'), depth=1, num_heads=1)
  bias = pos_only.apply({}, ids).layer(0).dense()[0, 0]
  assert bias[1, 2] == 1.0 and bias[1, 3] == 0.0
  neg_only = segment_bias.SegmentBias(_cfg(mode='fixed', sign='negative'), depth=1, num_heads=1)
  bias = neg_only.apply({}, ids).layer(0).dense()[0, 0]
  assert bias[1, 2] == 0.0 and bias[1, 3] == -1.0
  with pytest.raises(ValueError, match='segment_bias.mode'):
    segment_bias.SegmentBias(_cfg(mode='bogus'), depth=1, num_heads=1).init(jax.random.key(0), ids)


def test_checked_ids_takes_host_patch_ids_and_rejects_maps():
  ids = np.arange(2 * 16, dtype=np.uint8).reshape(2, 16)
  out = segment_bias.checked_ids({'segment_ids': ids}, 'segment_ids', 16, 4)
  assert out.dtype == jnp.int32 and out.tolist() == ids.tolist()
  with pytest.raises(ValueError, match="no 'segment_ids'.*segment_patch_size=4"):
    segment_bias.checked_ids({}, 'segment_ids', 16, 4)
  with pytest.raises(ValueError, match='expected .*16.*segment_patch_size=2'):  # a raw map
    segment_bias.checked_ids({'segment_ids': np.zeros((2, 8, 8), np.uint8)}, 'segment_ids',
                             8, 2)


def _vit(**seg):
  cfg = ml_collections.ConfigDict({'variant': 'mu/4', 'image_size': 16,
                                   'segment_bias': _cfg(**seg)})
  return ViT(cfg)


def _jitted(model):
  """model's init and apply, each one compiled program: run eagerly, every primitive of the
  ViT would compile on its own (most of these tests' time)."""
  init = jax.jit(lambda key, images, ids: model.init(key, images, segment_ids=ids))
  apply = jax.jit(lambda params, images, ids, return_attention=False: model.apply(
      params, images, segment_ids=ids, return_attention=return_attention), static_argnums=3)
  return init, apply


def test_zero_bias_equals_plain_vit_and_gradients_reach_u():
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 4)
  model = _vit()
  init, apply = _jitted(model)
  params = init(jax.random.key(2), images, ids)
  with_bias, _ = apply(params, images, ids)
  plain, _ = apply(params, images, None)
  np.testing.assert_allclose(with_bias, plain, atol=1e-6)  # u = 0 at init

  @jax.jit
  def grad(p):
    return jax.grad(lambda p: jnp.sum(model.apply(p, images, segment_ids=ids)[0] ** 2))(p)
  grads = grad(params)['params']['segment_bias']
  assert float(jnp.abs(grads['u_pos']).min()) > 0 and float(jnp.abs(grads['u_neg']).min()) > 0


def test_bias_enters_before_scaling_in_attention_maps():
  """Eq. 5: a +u bias on same-segment pairs multiplies their softmax weight by exp(u/√d)."""
  images = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
  ids = jnp.array([[1] * 8 + [2] * 8])
  model = _vit(mode='shared')
  init, apply = _jitted(model)
  params = init(jax.random.key(2), images, ids)
  _, base = apply(params, images, ids, True)
  params['params']['segment_bias']['u_pos'] = jnp.full((1, 1), 3.0)
  _, biased = apply(params, images, ids, True)
  a0, a1 = base['attention'][0][0, 0], biased['attention'][0][0, 0]
  # query 1 (seg 1): ratio of weights on key 2 (same seg) vs key 10 (other seg)
  ratio = (a1[1, 2] / a1[1, 10]) / (a0[1, 2] / a0[1, 10])
  np.testing.assert_allclose(ratio, np.exp(3.0 / np.sqrt(16)), rtol=1e-4)  # head_dim = 16
