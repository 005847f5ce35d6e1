"""SemanticMIM (proxy tokens) and its BEiT/MaskFeat baselines: predict targets of masked patches.

`config.model.proxy` = True: SemanticMIM's proxy encoder (models/proxy.py `ProxyViT`), the
head reads only the [MASK] stream. False: the BEiT/MaskFeat full-sequence encoder with mask
tokens (`MaskTokenViT`), the head reads the masked patch outputs. Target (`config.target`):
HOG (MaskFeat), normalised pixels, or tokens of a frozen tokenizer (BEiT); masks
(`config.masking`): random or BEiT block-wise, `config.mask_ratio`.
"""

import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimjax import masking
from mimjax import targets as targets_lib
from mimjax.data.normalize import normalize_images
from mimjax.models import layout
from mimjax.models import proxy as proxy_lib
from mimjax.models.vit import model_dims, num_prefix_tokens
from mimjax.objectives.base import Objective
from mimjax.tree import path_name


class SemanticMIM(nn.Module):
  """Backbone (`ProxyViT` or `MaskTokenViT`) + Linear head to the target (`head`)."""
  config: ml_collections.ConfigDict
  out_dim: int

  def setup(self):
    model = self.config.model
    self.proxy = bool(model.get('proxy', True))
    self.backbone = (proxy_lib.ProxyViT(model) if self.proxy
                     else proxy_lib.MaskTokenViT(model))
    # MaskFeat/BEiT heads: trunc_normal(.02) (±2 absolute → a plain normal), zero bias.
    self.head = nn.Dense(self.out_dim, kernel_init=nn.initializers.normal(0.02),
                         bias_init=nn.initializers.zeros)

  def __call__(self, images: jnp.ndarray, mask: masking.RandomMask, *, train: bool = False):
    """Predictions for the masked patches: (B, n_mask, out) in `masked_ids` order (proxy) or
    (B, N, out) for every patch (baseline; the loss weights the masked ones)."""
    if self.proxy:
      _, aux = self.backbone(images, mask.keep_ids, masking.masked_ids(mask), train=train)
      return self.head(aux['mask_tokens'])
    tokens, _ = self.backbone(images, mask.mask, train=train)
    return self.head(tokens[:, num_prefix_tokens(self.config.model):])


def validate(config: ml_collections.ConfigDict, num_patches: int) -> None:
  """Raises a ValueError naming the first bad key of a SemanticMIM/BEiT/MaskFeat config."""
  masking.num_masked(config, num_patches)  # checks masking / mask_ratio
  if config.get('target') not in targets_lib.TARGETS:
    raise ValueError(f'config.target={config.get("target")!r}: expected one of '
                     f'{targets_lib.TARGETS}')
  if not isinstance(config.model.get('proxy', True), bool):
    raise ValueError(f'config.model.proxy={config.model.proxy!r}: expected True (SemanticMIM) '
                     'or False (BEiT/MaskFeat baseline)')
  num_prefix_tokens(config.model)
  if config.model.get('proxy', True) and config.model.get('segment_bias', {}).get('enabled'):
    raise ValueError('config.model.segment_bias.enabled: not supported with proxy blocks')


def make(config: ml_collections.ConfigDict, tokenizer=None) -> Objective:
  """The objective; `tokenizer` (vocab_size, __call__(images) → (B, N) ids) overrides
  `config.tokenizer` for `config.target = 'tokens'` (e.g. a DALL-E dVAE wrapper)."""
  patch = model_dims(config.model)['patch_size']
  n = (config.model.image_size // patch) ** 2
  validate(config, n)
  target = targets_lib.make_target(config, patch, tokenizer)
  model = SemanticMIM(config, target.dim)

  scheme = config.get('init_scheme', 'default')
  if scheme not in INIT_SCHEMES:
    raise ValueError(f'config.init_scheme={scheme!r}: expected one of {INIT_SCHEMES}')

  def init(rng, batch):
    images = normalize_images(batch['image'][:1])
    m = masking.make_mask(config, jax.random.key(0), 1, n)
    init_rng, scheme_rng = jax.random.split(rng)
    params = model.init({'params': init_rng}, images, m)['params']
    return official_init(params, scheme_rng, scheme), {}

  def loss(params, state, batch, rng, step):
    del step
    images = normalize_images(batch['image'])
    mask_rng, drop_rng = jax.random.split(rng)
    m = masking.make_mask(config, mask_rng, images.shape[0], n)
    pred = model.apply({'params': params}, images, m, train=True, rngs={'dropout': drop_rng})
    labels = target.fn(images)
    if model_is_proxy(config):
      labels, weights = gather_patches(labels, masking.masked_ids(m)), None
    else:
      weights = m.mask
    value = targets_lib.target_loss(target, pred, labels, weights)
    metrics = {'mim_loss': value}
    if target.classification:
      hit = (jnp.argmax(pred, -1) == labels).astype(jnp.float32)
      w = jnp.ones_like(hit) if weights is None else weights
      metrics['mim_acc'] = jnp.sum(hit * w) / jnp.sum(w)
    return value, (state, metrics)

  return Objective(init=init, loss=loss, encoder=('backbone', 'encoder'))


INIT_SCHEMES = ('default', 'maskfeat', 'beit')


@layout.unrolled_view  # the names below are the unrolled blocks_{i}
def official_init(params, rng: jax.Array, scheme: str):
  """Re-initialises Linear/Conv weights as the official SemanticMIM backbones do.

  'maskfeat' (`MaskFeatViTOurs._init_weights`, applied last): every Linear and Conv weight
  trunc-normal(0.02) (±2 absolute: a plain normal), Linear biases 0, the patch-embedding conv
  bias keeps PyTorch's default. 'beit' (`BEiTPretrainViTOurs`, init_cfg TruncNormal 0.02 on
  Linear and Conv2d, bias 0, then `rescale_init_weight`): the same with the conv bias 0, and
  the attention `proj` and MLP `fc2` weights of block i (and of `extra_layers_i`) divided by
  √(2·(i + 1)). 'default' keeps the modules' own (MAE) init. Tokens, pos-embed and LayerNorms
  are already as in the official code (normal 0.02; 1 / 0).
  """
  if scheme == 'default':
    return params
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(rng, len(leaves))
  out = []
  for (path, x), key in zip(leaves, keys):
    name = path_name(path)
    if name.endswith('kernel'):  # Dense (in, out) and the patch-embedding conv
      x = 0.02 * jax.random.normal(key, x.shape, x.dtype)
      block = re.search(r'(?:blocks|extra_layers)_(\d+)/(?:attn/proj|mlp/fc2)/kernel$', name)
      if scheme == 'beit' and block:
        x = x / np.sqrt(2.0 * (int(block.group(1)) + 1))
    elif name.endswith('bias') and (scheme == 'beit' or 'patch_embed' not in name):
      if not re.search(r'(^|/)norm\w*/bias$', name):
        x = jnp.zeros_like(x)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def gather_patches(x: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
  """x (B, N, ...) → x[b, ids[b]] (B, n, ...)."""
  return jnp.take_along_axis(x, ids.reshape(ids.shape + (1,) * (x.ndim - 2)), axis=1)


def model_is_proxy(config: ml_collections.ConfigDict) -> bool:
  """True for SemanticMIM's proxy encoder, False for the mask-token baseline."""
  return bool(config.model.get('proxy', True))


def export_encoder(config: ml_collections.ConfigDict, params) -> tuple:
  """(ViT config, ViT params) of the pretrained encoder: a plain ViT with the proxies as
  prefix tokens, runnable with `mimjax.models.vit.ViT` (e.g. `return_layers=True`)."""
  return (proxy_lib.encoder_config(config.model),
          proxy_lib.export_encoder(params['backbone']))


def encode_for_eval(config: ml_collections.ConfigDict, params, images: jnp.ndarray,
                    layer: Optional[int] = None) -> jnp.ndarray:
  """Raw encoder tokens of normalised `images` after block `layer` (default
  `config.probe_layer`; -1 = last block, no final norm, as the official probe)."""
  layer = config.get('probe_layer') if layer is None else layer
  model_cfg, enc = export_encoder(config, params)
  return proxy_lib.encode_for_eval(model_cfg, enc, images, layer)
