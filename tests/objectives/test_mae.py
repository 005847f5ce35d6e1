"""MAE numerics vs a PyTorch reference transcribed from facebookresearch/mae models_mae.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from configs import mae as mae_config
from mimjax import masking
from mimjax.models.decoder import MAEDecoder
from mimjax.objectives import mae


def torch_patchify(imgs, p):  # imgs (N, 3, H, W), official code
  h = w = imgs.shape[2] // p
  x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
  x = torch.einsum('nchpwq->nhwpqc', x)
  return x.reshape(imgs.shape[0], h * w, p ** 2 * 3)


def torch_random_masking(noise, mask_ratio):
  n, l = noise.shape
  len_keep = int(l * (1 - mask_ratio))
  ids_shuffle = torch.argsort(noise, dim=1)
  ids_restore = torch.argsort(ids_shuffle, dim=1)
  ids_keep = ids_shuffle[:, :len_keep]
  mask = torch.ones([n, l])
  mask[:, :len_keep] = 0
  mask = torch.gather(mask, dim=1, index=ids_restore)
  return ids_keep, mask, ids_restore


def torch_forward_loss(imgs, pred, mask, p, norm_pix_loss=True):
  target = torch_patchify(imgs, p)
  if norm_pix_loss:
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.e-6) ** .5
  loss = ((pred - target) ** 2).mean(dim=-1)
  return (loss * mask).sum() / mask.sum()


def _images(seed=0, b=3, size=32):
  return np.random.default_rng(seed).normal(size=(b, size, size, 3)).astype(np.float32)


def test_patchify_matches_official_and_roundtrips():
  x = _images()
  ours = np.asarray(mae.patchify(jnp.asarray(x), 8))
  ref = torch_patchify(torch.from_numpy(x).permute(0, 3, 1, 2), 8).numpy()
  np.testing.assert_array_equal(ours, ref)
  np.testing.assert_array_equal(np.asarray(mae.unpatchify(jnp.asarray(ours), 8)), x)


def test_random_masking_matches_official():
  noise = np.random.default_rng(1).random((4, 49)).astype(np.float32)
  m = masking.random_masking_from_noise(jnp.asarray(noise), 0.75)
  keep, mask, restore = torch_random_masking(torch.from_numpy(noise), 0.75)
  np.testing.assert_array_equal(np.asarray(m.keep_ids), keep.numpy())
  np.testing.assert_array_equal(np.asarray(m.mask), mask.numpy())
  np.testing.assert_array_equal(np.asarray(m.restore_ids), restore.numpy())
  assert m.keep_ids.shape == (4, 12)  # int(49 * 0.25)


def test_mae_loss_matches_official():
  x = _images(2)
  rng = np.random.default_rng(3)
  pred = rng.normal(size=(3, 16, 192)).astype(np.float32)
  mask = (rng.random((3, 16)) > 0.5).astype(np.float32)
  for norm in (True, False):
    ours = float(mae.mae_loss(jnp.asarray(pred), jnp.asarray(x), jnp.asarray(mask), norm))
    ref = float(torch_forward_loss(torch.from_numpy(x).permute(0, 3, 1, 2),
                                   torch.from_numpy(pred), torch.from_numpy(mask), 8, norm))
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_decoder_unshuffle_matches_official():
  """Depth-0 decoder: embed → mask tokens → unshuffle → +pos → norm → pred, vs torch."""
  cfg = ml_collections.ConfigDict({'width': 8, 'depth': 0, 'num_heads': 2, 'mlp_dim': 16})
  dec = MAEDecoder(cfg, patch_size=4, image_size=16, out_dim=48)
  noise = np.random.default_rng(0).random((2, 16)).astype(np.float32)
  m = masking.random_masking_from_noise(jnp.asarray(noise), 0.75)
  tokens = np.random.default_rng(1).normal(size=(2, 5, 12)).astype(np.float32)
  params = jax.jit(dec.init)(jax.random.key(0), jnp.asarray(tokens), m.restore_ids)
  ours = np.asarray(jax.jit(dec.apply)(params, jnp.asarray(tokens), m.restore_ids))

  p = jax.tree.map(lambda a: torch.from_numpy(np.asarray(a)), params['params'])
  x = torch.from_numpy(tokens) @ p['embed']['kernel'] + p['embed']['bias']
  ids_restore = torch.from_numpy(np.asarray(m.restore_ids)).long()
  mask_tokens = p['mask_token'].repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
  x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
  x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
  x = torch.cat([x[:, :1, :], x_], dim=1) + p['pos_embed']
  x = torch.nn.functional.layer_norm(x, (8,), p['norm']['scale'], p['norm']['bias'], 1e-6)
  ref = (x @ p['pred']['kernel'] + p['pred']['bias'])[:, 1:]
  np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


@pytest.fixture(scope='module')
def tiny_init():
  """(params, state) of the tiny MAE, one compiled init (eagerly, every primitive compiles on
  its own) for the tests below: the masking scheme and batch size add no parameters."""
  batch = {'image': np.zeros((1, 32, 32, 3), np.uint8)}
  return jax.jit(mae.make(mae_config.get_config('tiny')).init)(jax.random.key(0), batch)


def test_tiny_objective_loss_is_finite_and_has_grad(tiny_init):
  config = mae_config.get_config('tiny')
  obj = mae.make(config)
  batch = {'image': np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)}
  params, state = tiny_init
  (loss, (_, metrics)), grads = jax.jit(jax.value_and_grad(obj.loss, has_aux=True),
                                        static_argnums=4)(
      params, state, batch, jax.random.key(1), 0)
  assert np.isfinite(loss) and float(loss) > 0.1
  assert float(jnp.abs(grads['encoder']['pos_embed']).max()) == 0.0  # frozen sincos
  assert float(jnp.abs(grads['encoder']['cls_token']).max()) > 0.0


def test_block_masking_through_config_keeps_a_fixed_count(tiny_init):
  config = mae_config.get_config('tiny')
  config.masking = 'block'
  config.mask_ratio = 0.5
  obj = mae.make(config)
  batch = {'image': np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)}
  params, state = tiny_init
  loss, _ = jax.jit(obj.loss, static_argnums=4)(params, state, batch, jax.random.key(1), 0)
  assert np.isfinite(loss)
  m = masking.make_mask(config, jax.random.key(1), 2, 64)
  np.testing.assert_array_equal(np.asarray(m.mask).sum(-1), [32, 32])
  config.target = 'hog'
  with np.testing.assert_raises_regex(ValueError, 'config.target'):
    mae.make(config)
