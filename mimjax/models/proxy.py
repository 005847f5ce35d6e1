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

from mimjax.models.vit import (DTYPES, Block, ViT, model_dims, num_prefix_tokens,
                               pos_embed_frozen, resize_pos_embed)

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

  def setup(self):
    cfg = self.config
    dims = model_dims(cfg)
    depth = dims['depth']
    self.encoder = ViT(cfg)
    block = nn.remat(Block, static_argnums=(5, 6)) if cfg.get('remat') else Block
    drop_path = cfg.get('drop_path', 0.0)
    self.extra_layers = [
        block(dims['num_heads'], dims['mlp_dim'], dtype=DTYPES[cfg.get('dtype', 'float32')],
              drop_path=drop_path * i / max(depth - 1, 1), attention=cfg.get('attention', 'xla'))
        for i in range(depth)]
    self.mask_token = _mask_token(self, dims['width'])

  def __call__(self, images: jnp.ndarray, keep_ids: jnp.ndarray, mask_ids: jnp.ndarray, *,
               train: bool = False, return_layers: bool = False,
               return_attention: bool = False):
    cfg = self.config
    dtype = DTYPES[cfg.get('dtype', 'float32')]
    tokens, aux = self.encoder(images, keep_ids=keep_ids, train=train, return_layers=True,
                               return_attention=return_attention)
    enc = self.encoder.variables['params']
    prefix = num_prefix_tokens(cfg)
    grid = images.shape[1] // model_dims(cfg)['patch_size']
    pos = encoder_pos_embed(enc, cfg, grid)[:, prefix:]
    pos = jnp.take_along_axis(jnp.broadcast_to(pos, (images.shape[0],) + pos.shape[1:]),
                              mask_ids[..., None], axis=1)
    m = (self.mask_token + pos).astype(dtype)
    mask_layers, cross = [], []
    for i, layer in enumerate(self.extra_layers):
      # kv = [PROXY after this layer's self-attention block, MASK before this layer].
      kv = jnp.concatenate([aux['layers'][i][:, :prefix], m], axis=1)
      m, attn = layer(m, kv, None, None, train, return_attention)
      mask_layers.append(m)
      cross.append(attn)
    # The encoder's own final LayerNorm, applied to the [MASK] stream too.
    m = nn.LayerNorm(epsilon=1e-6, dtype=dtype, parent=None).apply({'params': enc['norm']}, m)
    out = {'mask_tokens': m}
    if return_layers:
      out.update(layers=aux['layers'], mask_layers=mask_layers)
    if return_attention:
      out.update(attention=aux['attention'], cross_attention=cross)
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
