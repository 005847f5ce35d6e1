"""MAE (He et al. 2022): reconstruct the normalised pixels of randomly masked patches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mimjax import masking
from mimjax.data.normalize import normalize_images
from mimjax.models import segment_bias
from mimjax.models.decoder import MAEDecoder
from mimjax.models.vit import ViT, model_dims
from mimjax.objectives.base import Objective
# Pixel targets live with the other targets; patchify/unpatchify stay importable from here
# (`mimjax.objectives.mae.patchify` is part of the documented API).
from mimjax.targets import masked_mse, patchify, pixel_targets, unpatchify  # noqa: F401


def mae_loss(pred: jnp.ndarray, images_nhwc: jnp.ndarray, mask: jnp.ndarray,
             norm_pix: bool = True) -> jnp.ndarray:
  """MAE `forward_loss`: MSE on (normalised) pixels of removed patches only."""
  p = int(round((pred.shape[-1] // images_nhwc.shape[-1]) ** 0.5))
  return masked_mse(pred, pixel_targets(images_nhwc, p, norm_pix), mask)


def decoder_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Decoder sizes from config.model.decoder, sharing the encoder's dtype/attention/scan."""
  dec = ml_collections.ConfigDict(config.model.decoder.to_dict())
  dec.dtype = config.model.get('dtype', 'float32')
  dec.attention = config.model.get('attention', 'xla')
  dec.scan_layers = config.model.get('scan_layers', False)
  return dec


class MAE(nn.Module):
  """Encoder on the visible patches + MAE decoder predicting every patch."""
  config: ml_collections.ConfigDict

  def setup(self):
    dims = model_dims(self.config.model)
    self.patch_size = dims['patch_size']
    self.encoder = ViT(self.config.model)
    self.decoder = MAEDecoder(decoder_config(self.config), patch_size=dims['patch_size'],
                              image_size=self.config.model.image_size,
                              out_dim=dims['patch_size'] ** 2 * 3)

  def encode(self, images, keep_ids=None, *, train=False, **kw):
    return self.encoder(images, keep_ids=keep_ids, train=train, **kw)

  def decode(self, tokens, restore_ids, *, train=False):
    return self.decoder(tokens, restore_ids, train=train)

  def __call__(self, images, keep_ids, restore_ids, segment_ids=None, *, train=False):
    tokens, _ = self.encode(images, keep_ids, segment_ids=segment_ids, train=train)
    return self.decode(tokens, restore_ids, train=train)


def num_patches(config: ml_collections.ConfigDict) -> int:
  return (config.model.image_size // model_dims(config.model)['patch_size']) ** 2


def batch_segment_ids(config: ml_collections.ConfigDict, batch: dict):
  """Patch segment ids (…, N) int32 when the model uses the MRE bias, else None.

  The data pipeline computes them on the host (data.segment_patch_size, docs/mre.md); the
  device never sees the (H, W) maps."""
  seg = config.model.get('segment_bias')
  if seg is None or not seg.enabled:
    return None
  return segment_bias.checked_ids(batch, 'segment_ids', config.model.image_size,
                                  model_dims(config.model)['patch_size'])


def make(config: ml_collections.ConfigDict) -> Objective:
  """MAE objective from `config.model`, `config.mask_ratio`, `config.masking`, `config.norm_pix`."""
  if config.get('target', 'pixel') != 'pixel':
    raise ValueError(f'config.target={config.target!r}: the MAE objective predicts pixels; use '
                     'configs/maskfeat.py or configs/semantic_mim.py for HOG/token targets')
  model = MAE(config)
  n = num_patches(config)

  def init(rng, batch):
    images = normalize_images(batch['image'][:1])
    m = masking.random_masking(jax.random.key(0), 1, n, config.mask_ratio)
    seg = batch_segment_ids(config, {k: v[:1] for k, v in batch.items()})
    params = model.init({'params': rng}, images, m.keep_ids, m.restore_ids, seg)['params']
    return params, {}

  def loss(params, state, batch, rng, step):
    del step
    images = normalize_images(batch['image'])
    mask_rng, drop_rng = jax.random.split(rng)
    m = masking.make_mask(config, mask_rng, images.shape[0], n)  # random (MAE) or block
    pred = model.apply({'params': params}, images, m.keep_ids, m.restore_ids,
                       batch_segment_ids(config, batch), train=True, rngs={'dropout': drop_rng})
    value = mae_loss(pred, images, m.mask, config.norm_pix)
    return value, (state, {'mae_loss': value})

  return Objective(init=init, loss=loss)
