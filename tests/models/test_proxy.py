"""SemanticMIM proxy encoder: information flow, export to a plain ViT, cross block numerics."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import timm
import torch

from mimjax import masking
from mimjax.models import proxy
from mimjax.models.vit import ViT, pool_tokens


def _config(num_prefix=8, pos_embed='learned', depth=2):
  return ml_collections.ConfigDict({
      'variant': 'mu/4', 'image_size': 32, 'pos_embed': pos_embed, 'depth': depth,
      'num_prefix_tokens': num_prefix, 'proxy': True})


@functools.partial(jax.jit, static_argnums=1)  # one program, not one per primitive
def _random_ids(key, b):
  m = masking.random_masking(key, b, 64, 0.6)
  return m.keep_ids, masking.masked_ids(m)


def _inputs(seed=0, b=2):
  images = jnp.asarray(np.random.default_rng(seed).normal(size=(b, 32, 32, 3)), jnp.float32)
  return (images, *_random_ids(jax.random.key(seed), b))


def _init(cfg, images, keep, masked):
  return jax.jit(proxy.ProxyViT(cfg).init)(jax.random.key(1), images, keep, masked)['params']


def _apply(model):
  """model.apply as one compiled program (eagerly every primitive compiles on its own: most of
  these tests' time); return_layers is a Python flag."""
  return jax.jit(model.apply, static_argnames='return_layers')


def _encode_for_eval(cfg, enc, images, layer=None):
  return jax.jit(lambda e, x: proxy.encode_for_eval(cfg, e, x, layer))(enc, images)


def test_mask_stream_sees_the_image_only_through_proxies():
  images, keep, masked = _inputs()
  other = images[::-1] * 3.0 + 1.0
  for num_prefix, depends in ((0, False), (2, True)):
    cfg = _config(num_prefix)
    model = proxy.ProxyViT(cfg)
    params = _init(cfg, images, keep, masked)
    run = jax.jit(lambda x: model.apply({'params': params}, x, keep, masked))
    (tok_a, aux_a), (tok_b, aux_b) = run(images), run(other)
    assert aux_a['mask_tokens'].shape == (2, masked.shape[1], 64)
    assert not np.allclose(tok_a, tok_b)  # the [IMG] stream does see the images
    diff = float(jnp.abs(aux_a['mask_tokens'] - aux_b['mask_tokens']).max())
    if depends:
      assert diff > 1e-3
    else:
      assert diff == 0.0


def test_img_and_proxy_stream_ignores_mask_stream_and_exports_to_vit():
  cfg = _config(8, pos_embed='sincos')
  images, keep, masked = _inputs(1)
  apply = _apply(proxy.ProxyViT(cfg))
  params = _init(cfg, images, keep, masked)
  tokens, aux = apply({'params': params}, images, keep, masked, return_layers=True)
  assert tokens.shape == (2, 8 + keep.shape[1], 64)
  # Changing the pretraining-only params leaves [IMG]/[PROXY] untouched.
  changed = jax.tree.map(lambda x: x, params)
  changed['mask_token'] = params['mask_token'] + 1.0
  changed['extra_layers_0'] = jax.tree.map(lambda x: x * 2.0, params['extra_layers_0'])
  # Same program as `tokens` (return_layers too): the exact comparison is about the params.
  tokens2, aux2 = apply({'params': changed}, images, keep, masked, return_layers=True)
  np.testing.assert_array_equal(tokens2, tokens)
  assert not np.allclose(aux2['mask_tokens'], aux['mask_tokens'])
  # The exported encoder is a plain ViT (proxies = cls_token + reg_token) with the same outputs.
  enc = proxy.export_encoder(params)
  assert 'mask_token' not in enc and not any(k.startswith('extra_layers') for k in enc)
  assert enc['cls_token'].shape == (1, 1, 64) and enc['reg_token'].shape == (1, 7, 64)
  assert enc['pos_embed'].shape == (1, 8 + 64, 64)
  vit_cfg = proxy.encoder_config(cfg)
  assert 'proxy' not in vit_cfg and vit_cfg.num_prefix_tokens == 8
  vit_apply = _apply(ViT(vit_cfg))
  vit_tokens, vit_aux = vit_apply({'params': enc}, images, keep_ids=keep, return_layers=True)
  np.testing.assert_allclose(vit_tokens, tokens, rtol=1e-6, atol=1e-6)
  for a, b in zip(vit_aux['layers'], aux['layers']):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Evaluation read-out at any layer (full image, all 64 patches).
  full, full_aux = vit_apply({'params': enc}, images, return_layers=True)
  np.testing.assert_allclose(_encode_for_eval(cfg, enc, images, 1), full_aux['layers'][0],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_encode_for_eval(cfg, enc, images, -1),
                             full_aux['layers'][-1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_encode_for_eval(cfg, enc, images), full, rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(pool_tokens(full, 'cls', 8), full[:, :8].mean(1), rtol=1e-6)
  with pytest.raises(ValueError, match='probe layer'):
    proxy.encode_for_eval(cfg, enc, images, 3)


def _t(x):
  return torch.from_numpy(np.array(x, np.float32))


def torch_cross_block(m, kv, p):
  """SemanticMIM extra layer, from Eq. 4 + the official block: one LN (`ln1`) for q and kv,
  separate q / kv Linears, residual on the [MASK] stream, then LN → MLP (exact GELU)."""
  ln1 = lambda x: torch.nn.functional.layer_norm(x, (x.shape[-1],), _t(p['norm1']['scale']),
                                                 _t(p['norm1']['bias']), 1e-6)
  lin = lambda x, q: x @ _t(q['kernel']) + _t(q['bias'])
  b, nq, d = m.shape
  heads, hd = 4, d // 4
  q = lin(ln1(m), p['attn']['q']).reshape(b, nq, heads, hd).transpose(1, 2)
  k, v = lin(ln1(kv), p['attn']['kv']).chunk(2, dim=-1)
  k = k.reshape(b, -1, heads, hd).transpose(1, 2)
  v = v.reshape(b, -1, heads, hd).transpose(1, 2)
  attn = torch.softmax(q @ k.transpose(-2, -1) * hd ** -0.5, dim=-1)
  y = (attn @ v).transpose(1, 2).reshape(b, nq, d)
  m = m + lin(y, p['attn']['proj'])
  h = torch.nn.functional.layer_norm(m, (d,), _t(p['norm2']['scale']), _t(p['norm2']['bias']),
                                     1e-6)
  h = torch.nn.functional.gelu(lin(h, p['mlp']['fc1']))
  return m + lin(h, p['mlp']['fc2'])


def test_mask_stream_matches_torch_reference():
  cfg = _config(8)
  images, keep, masked = _inputs(2)
  params = _init(cfg, images, keep, masked)
  params = jax.tree.map(  # non-trivial LN affine so a wrong LN shows
      lambda x: x + 0.1 * np.random.default_rng(x.size).normal(size=x.shape).astype(np.float32),
      params)
  _, aux = _apply(proxy.ProxyViT(cfg))({'params': params}, images, keep, masked,
                                       return_layers=True)
  enc = params['encoder']
  pos = _t(enc['pos_embed'])[:, 8:].expand(2, -1, -1)
  m = _t(params['mask_token']) + torch.gather(
      pos, 1, torch.from_numpy(np.asarray(masked, np.int64))[..., None].expand(-1, -1, 64))
  for i in range(2):
    proxies = _t(aux['layers'][i])[:, :8]  # [PROXY] after layer i's self-attention block
    m = torch_cross_block(m, torch.cat([proxies, m], dim=1), params[f'extra_layers_{i}'])
    np.testing.assert_allclose(aux['mask_layers'][i], m.numpy(), rtol=2e-5, atol=2e-5)
  m = torch.nn.functional.layer_norm(m, (64,), _t(enc['norm']['scale']), _t(enc['norm']['bias']),
                                     1e-6)
  np.testing.assert_allclose(aux['mask_tokens'], m.numpy(), rtol=2e-5, atol=2e-5)


def test_exported_vit_b_with_8_proxies_counts_like_timm_reg_tokens():
  cfg = ml_collections.ConfigDict({'variant': 'B/16', 'image_size': 224, 'pos_embed': 'learned',
                                   'num_prefix_tokens': 8})
  shapes = jax.eval_shape(lambda: ViT(cfg).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  with torch.device('meta'):
    model = timm.create_model('vit_base_patch16_224', num_classes=0, reg_tokens=7)
  assert ours == sum(p.numel() for p in model.parameters())


def test_mask_token_baseline_replaces_masked_patches():
  cfg = _config(1)
  cfg.proxy = False
  images, _, _ = _inputs(3)
  mask = jax.jit(lambda k: masking.block_masking(k, 2, (8, 8), 26, 5).mask)(jax.random.key(0))
  model = proxy.MaskTokenViT(cfg)
  params = jax.jit(model.init)(jax.random.key(0), images, mask)['params']
  assert set(params) == {'encoder', 'mask_token'}
  apply = _apply(model)
  tokens, _ = apply({'params': params}, images, mask)
  assert tokens.shape == (2, 65, 64)
  # Masked patches carry no image content: changing pixels only inside masked patches changes
  # nothing; with mask = 0 the model is the plain ViT.
  inside = np.repeat(np.repeat(np.asarray(mask).reshape(2, 8, 8), 4, 1), 4, 2)[..., None]
  edited = images + 5.0 * inside
  np.testing.assert_allclose(apply({'params': params}, edited, mask)[0], tokens,
                             rtol=1e-5, atol=1e-5)
  plain, _ = _apply(ViT(cfg))({'params': params['encoder']}, images)
  np.testing.assert_allclose(apply({'params': params}, images, jnp.zeros_like(mask))[0],
                             plain, rtol=1e-6, atol=1e-6)
