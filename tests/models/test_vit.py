"""ViT: parameter counts vs timm, sincos pos-embed vs MAE's formula, pos-embed resize vs DINO's
F.interpolate, attention numerics."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from mimjax.models.attention import Attention
from mimjax.models.vit import (ViT, decode_variant, pool_tokens, resize_pos_embed,
                               sincos_pos_embed_2d)


def _count(variant, image_size=224):
  cfg = ml_collections.ConfigDict({'variant': variant, 'image_size': image_size})
  shapes = jax.eval_shape(lambda: ViT(cfg).init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize('variant,name', [('S/16', 'vit_small_patch16_224'),
                                          ('B/16', 'vit_base_patch16_224'),
                                          ('L/16', 'vit_large_patch16_224')])
def test_param_count_equals_timm(variant, name):
  with torch.device('meta'):
    model = timm.create_model(name, num_classes=0, pretrained=False)
  assert _count(variant) == sum(p.numel() for p in model.parameters())


def test_decode_variant_and_errors():
  assert decode_variant('H/14') == dict(width=1280, depth=32, num_heads=16, mlp_dim=5120, patch_size=14)
  with pytest.raises(ValueError, match='model.variant'):
    decode_variant('X/16')


def _mae_reference_pos_embed(embed_dim, grid_size):
  """MAE util/pos_embed.py, transcribed from the official formulas."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

  def one_d(d, pos):
    omega = 1. / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.))
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
  return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_matches_mae_reference():
  ours = sincos_pos_embed_2d(64, 5, cls_token=True)
  np.testing.assert_allclose(ours, _mae_reference_pos_embed(64, 5), atol=1e-6)
  assert np.all(ours[0] == 0)
  # token at (row 0, col 1): first half encodes the column → sin(1) at dim 0.
  np.testing.assert_allclose(ours[2, 0], np.sin(1.0), atol=1e-6)
  np.testing.assert_allclose(ours[1 + 5, 32], np.sin(1.0), atol=1e-6)  # row 1, col 0


def _dino_interpolate_pos_encoding(pos, w, h, patch):
  """DINO vision_transformer.py `interpolate_pos_encoding` (cls + patch rows, torch)."""
  n, dim = pos.shape[1] - 1, pos.shape[-1]
  w0, h0 = w // patch + 0.1, h // patch + 0.1
  patch_pos = F.interpolate(
      pos[:, 1:].reshape(1, int(np.sqrt(n)), int(np.sqrt(n)), dim).permute(0, 3, 1, 2),
      scale_factor=(w0 / np.sqrt(n), h0 / np.sqrt(n)), mode='bicubic')
  assert int(w0) == patch_pos.shape[-2] and int(h0) == patch_pos.shape[-1]
  return torch.cat((pos[:, :1], patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)), dim=1)


@pytest.mark.parametrize('old,image,patch', [(14, 96, 16), (28, 96, 8), (14, 256, 16),
                                             (7, 80, 16), (5, 48, 16), (9, 52, 4), (4, 20, 2)])
def test_pos_embed_resize_matches_dino_interpolate(old, image, patch):
  """DINO's 96-px local crops: 14→6 (224/16), 28→12 (224/8), upsampling and odd grids."""
  pos = np.random.default_rng(old).normal(0, 0.02, (1, 1 + old * old, 32)).astype(np.float32)
  expected = _dino_interpolate_pos_encoding(torch.from_numpy(pos), image, image, patch).numpy()
  ours = np.asarray(resize_pos_embed(jnp.asarray(pos), 1, image // patch))
  assert ours.shape == expected.shape
  np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-7 * np.abs(pos).max() * 10)


def _jitted(module):
  """module's init and apply, each one compiled program: eagerly every primitive compiles on
  its own (most of these tests' time). Python flags are static."""
  return jax.jit(module.init), jax.jit(module.apply, static_argnames=(
      'return_layers', 'return_attention'))


def test_attention_matches_manual_with_bias_before_scaling():
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  bias = jax.random.normal(jax.random.key(2), (2, 1, 5, 5))
  init, apply = _jitted(Attention(num_heads=2))
  params = init(jax.random.key(0), x)
  out, probs = apply(params, x, logit_bias=bias, return_attention=True)
  p = params['params']
  qkv = x @ p['qkv']['kernel'] + p['qkv']['bias']
  q, k, v = [t.reshape(2, 5, 2, 4) for t in jnp.split(qkv, 3, -1)]
  logits = (jnp.einsum('bqhd,bkhd->bhqk', q, k) + bias) / 2.0  # (qk + b)/sqrt(d), d = 4
  ref_probs = jax.nn.softmax(logits, -1)
  ref = jnp.einsum('bhqk,bkhd->bqhd', ref_probs, v).reshape(2, 5, 8)
  ref = ref @ p['proj']['kernel'] + p['proj']['bias']
  np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_attention_key_mask_and_bf16_softmax_in_float32():
  x = jax.random.normal(jax.random.key(1), (1, 4, 8)).astype(jnp.bfloat16)
  init, apply = _jitted(Attention(num_heads=2, dtype=jnp.bfloat16))
  params = init(jax.random.key(0), x)
  mask = jnp.array([[True, True, False, True]])
  _, probs = apply(params, x, key_mask=mask, return_attention=True)
  assert probs.dtype == jnp.float32
  np.testing.assert_allclose(probs[..., 2], 0.0)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)


def test_vit_forward_shapes_masking_and_aux():
  cfg = ml_collections.ConfigDict({'variant': 'mu/4', 'image_size': 32})
  init, apply = _jitted(ViT(cfg))
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = init(jax.random.key(1), images)
  tokens, aux = apply(params, images, return_layers=True, return_attention=True)
  assert tokens.shape == (2, 65, 64)
  assert len(aux['layers']) == 2 and aux['attention'][0].shape == (2, 4, 65, 65)
  keep = jnp.array([[3, 0, 7], [1, 2, 60]])
  vis, _ = apply(params, images, keep_ids=keep)
  assert vis.shape == (2, 4, 64)
  np.testing.assert_allclose(pool_tokens(tokens, 'mean'), np.asarray(tokens)[:, 1:].mean(1),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pool_tokens(tokens, 'cls', num_prefix=3),
                             np.asarray(tokens)[:, :3].mean(1), rtol=1e-5, atol=1e-6)


def test_keep_ids_select_exactly_the_requested_patches():
  # Encoding only the visible tokens differs from full encoding (attention context), but the
  # embedding step must pick exactly the requested patches (with their own pos-embed rows):
  # with no blocks, each token is LayerNorm(its embedding), so the visible run must equal the
  # full run's rows at keep_ids, in keep_ids order.
  cfg = ml_collections.ConfigDict({'variant': 'mu/4', 'image_size': 32, 'depth': 0})
  init, apply = _jitted(ViT(cfg))
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = init(jax.random.key(1), images)
  full, _ = apply(params, images)
  keep = np.array([[3, 0, 7], [1, 2, 60]])
  vis, _ = apply(params, images, keep_ids=jnp.asarray(keep))
  full = np.asarray(full)
  np.testing.assert_allclose(vis[:, 0], full[:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(vis[:, 1:], full[np.arange(2)[:, None], 1 + keep], rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(vis[0, 1], vis[0, 2])  # distinct patches really are distinct


def test_remat_gives_same_output():
  cfg = ml_collections.ConfigDict({'variant': 'mu/4', 'image_size': 32, 'remat': False})
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  init, apply = _jitted(ViT(cfg))
  params = init(jax.random.key(1), images)
  a, _ = apply(params, images)
  cfg.remat = True
  b, _ = _jitted(ViT(cfg))[1](params, images)
  np.testing.assert_allclose(a, b, atol=1e-6)
