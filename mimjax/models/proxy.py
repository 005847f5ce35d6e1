"""SemanticMIM proxy encoder (dual cascade per layer) and the BEiT/MaskFeat mask-token baseline.

SemanticMIM (paper §3.3, Eq. 3-4), per layer i:
  [IMG, PROXY]^{i+1} = MLP(SelfAttn([IMG, PROXY]^i))                 — `encoder.blocks_i`
  [MASK]^{i+1}       = MLP(CrossAttn(q=[MASK]^i, kv=[PROXY^{i+1}, MASK]^i)) — `extra_layers_i`
[IMG] and [MASK] never see each other; [PROXY] tokens (cls-like, each with its own learned
position) are the only path between them. The [IMG]/[PROXY] stream does not depend on [MASK],
so it *is* a plain `ViT` with `num_prefix_tokens` = #proxies run on the visible patches: its
params live under `encoder` in the ViT layout, and exporting = dropping `extra_layers_*` and
`mask_token` (`export_encoder`). [MASK] = `mask_token` + pos-embed of its position, and the
encoder's final LayerNorm is applied to it as to all tokens (official code).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mimjax.models.vit import (DTYPES, ViT, block_factory, block_stack, drop_paths, model_dims,
                               num_prefix_tokens, pos_embed_frozen, resize_pos_embed)

Params = Any


def _mask_token(module: nn.Module, width: int) -> jnp.ndarray:
  # BEiT/MaskFeat: trunc_normal(std=.02) with ±2 absolute bounds = a plain normal.
  return module.param('mask_token', nn.initializers.normal(0.02), (1, 1, width))


def encoder_pos_embed(encoder_params: Params, config: ml_collections.ConfigDict,
                      grid: int) -> jnp.ndarray:
  """The ViT's (1, prefix + grid², D) pos-embed as its forward uses it (`pos_embed_frozen`)."""
  pos = encoder_params['pos_embed']
  if pos_embed_frozen(config):
    pos = jax.lax.stop_gradient(pos)
  return resize_pos_embed(pos, num_prefix_tokens(config), grid)


class ProxyViT(nn.Module):
  """SemanticMIM encoder: `encoder` (ViT with proxies as prefix tokens) + `extra_layers_i`.

  __call__(images, keep_ids (B, n_img), mask_ids (B, n_mask)) → (tokens, aux):
    tokens: final-normed [PROXY, IMG] (B, P + n_img, D), exactly the exported ViT's output;
    aux['mask_tokens']: final-normed [MASK] outputs (B, n_mask, D), in `mask_ids` order;
    aux['layers'] / aux['mask_layers']: per-layer [PROXY, IMG] / [MASK] states (return_layers);
    aux['attention'] / aux['cross_attention']: per-layer maps (return_attention).
  """
  config: ml_collections.ConfigDict  # config.model

  @nn.compact
  def __call__(self, images: jnp.ndarray, keep_ids: jnp.ndarray, mask_ids: jnp.ndarray, *,
               train: bool = False, return_layers: bool = False,
               return_attention: bool = False):
    cfg = self.config
    dims = model_dims(cfg)
    dtype = DTYPES[cfg.get('dtype', 'float32')]
    encoder = ViT(cfg, name='encoder')
    tokens, aux = encoder(images, keep_ids=keep_ids, train=train, return_layers=True,
                          return_attention=return_attention)
    enc = encoder.variables['params']
    prefix = num_prefix_tokens(cfg)
    grid = images.shape[1] // dims['patch_size']
    pos = encoder_pos_embed(enc, cfg, grid)[:, prefix:]
    pos = jnp.take_along_axis(jnp.broadcast_to(pos, (images.shape[0],) + pos.shape[1:]),
                              mask_ids[..., None], axis=1)
    m = (_mask_token(self, dims['width']) + pos).astype(dtype)
    # Layer i's kv = [PROXY after the encoder's block i, MASK before this layer].
    per_layer = {'proxy': jnp.stack([h[:, :prefix] for h in aux['layers']]),
                 'drop': drop_paths(self, dims['depth'], cfg.get('drop_path', 0.0), train)}
    step = lambda layer, m, row: layer(m, jnp.concatenate([row['proxy'], m], axis=1), None,
                                       row['drop'])
    m, mask_out = block_stack(
        m, per_layer, step, depth=dims['depth'], name='extra_layers',
        scan=cfg.get('scan_layers', False), return_layers=return_layers,
        return_attention=return_attention,
        make_block=block_factory(cfg, num_heads=dims['num_heads'], mlp_dim=dims['mlp_dim'],
                                 return_attention=return_attention))
    # The encoder's own final LayerNorm, applied to the [MASK] stream too.
    m = nn.LayerNorm(epsilon=1e-6, dtype=dtype, parent=None).apply({'params': enc['norm']}, m)
    out = {'mask_tokens': m}
    if return_layers:
      out.update(layers=aux['layers'], mask_layers=mask_out.layers)
    if return_attention:
      out.update(attention=aux['attention'], cross_attention=mask_out.attention)
    return tokens, out


class MaskTokenViT(nn.Module):
  """BEiT/MaskFeat baseline: full-sequence ViT where masked patch embeddings are replaced by
  `mask_token` inside the encoder. __call__(images, mask (B, N)) → ViT's (tokens, aux)."""
  config: ml_collections.ConfigDict  # config.model

  def setup(self):
    self.encoder = ViT(self.config)
    self.mask_token = _mask_token(self, model_dims(self.config)['width'])

  def __call__(self, images: jnp.ndarray, mask: jnp.ndarray, *, train: bool = False,
               return_layers: bool = False, return_attention: bool = False):
    return self.encoder(images, mask=mask, mask_token=self.mask_token, train=train,
                        return_layers=return_layers, return_attention=return_attention)


def export_encoder(backbone_params: Params) -> Params:
  """Pretraining backbone params → the plain ViT params (proxies included as `cls_token` +
  `reg_token`); `extra_layers_*` and `mask_token` are pretraining-only and dropped."""
  return backbone_params['encoder']


def encoder_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ViT config of the exported encoder (`num_prefix_tokens` = proxies, no `proxy` key)."""
  out = ml_collections.ConfigDict(model_config.to_dict())
  if 'proxy' in out:
    del out['proxy']
  out.num_prefix_tokens = num_prefix_tokens(model_config)
  return out


def encode_for_eval(model_config: ml_collections.ConfigDict, encoder_params: Params,
                    images: jnp.ndarray, layer: Optional[int] = None) -> jnp.ndarray:
  """Tokens (B, P + N, D) of the exported encoder: the raw output of block `layer` (1-based;
  7 = the paper's probe; -1 = the last block, the repo's probe with `final_norm=False`) or,
  for None, the final-normed output."""
  depth = model_dims(model_config)['depth']
  if layer is not None and layer != -1 and not 1 <= layer <= depth:
    raise ValueError(f'probe layer {layer!r}: expected 1..{depth}, -1 (last) or None (normed)')
  tokens, aux = ViT(encoder_config(model_config)).apply(
      {'params': encoder_params}, images, return_layers=layer is not None)
  return tokens if layer is None else aux['layers'][layer - 1 if layer > 0 else -1]
