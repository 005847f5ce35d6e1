"""Reconstruction targets for masked image modeling: HOG (MaskFeat), pixels (MAE), tokens (BEiT).

`config.target` ∈ {pixel, hog, tokens} selects one; `make_target(config, patch_size)` returns a
`Target` whose `fn(images)` maps the normalised (B, H, W, 3) batch to per-patch targets:
float (B, N, dim) for regression (pixel, hog) or int32 token ids (B, N) for classification
over `dim` classes (tokens). Targets carry no gradient.
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mimjax.hog import hog_config, hog_dim, hog_targets

TARGETS = ('pixel', 'hog', 'tokens')


# ---------------------------------------------------------------------------------------- pixels
def patchify(images: jnp.ndarray, p: int) -> jnp.ndarray:
  """(B, H, W, C) → (B, h·w, p·p·C), per-patch order (p, q, c), patches row-major."""
  b, h, w, c = images.shape
  if h % p or w % p:
    raise ValueError(f'image size {(h, w)} not divisible by patch size {p}')
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jnp.ndarray, p: int, channels: int = 3) -> jnp.ndarray:
  """Inverse of `patchify` for square images."""
  b, n, _ = patches.shape
  g = int(round(n ** 0.5))
  x = patches.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * p, g * p, channels)


def pixel_targets(images: jnp.ndarray, p: int, norm_pix: bool) -> jnp.ndarray:
  """MAE targets: patchified pixels, optionally per-patch normalised (unbiased var, eps 1e-6)."""
  target = patchify(images.astype(jnp.float32), p)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, ddof=1, keepdims=True)  # torch .var() is unbiased
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def masked_mse(pred: jnp.ndarray, target: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Per-patch mean squared error, averaged over the patches where mask == 1."""
  per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


# ------------------------------------------------------------------------------------- targets
class Target(NamedTuple):
  """A reconstruction target: `fn(images) -> targets`, width `dim`, and its loss kind."""
  fn: Callable[[jnp.ndarray], jnp.ndarray]
  dim: int            # regression width, or vocabulary size for 'tokens'
  classification: bool


def make_target(config: ml_collections.ConfigDict, patch_size: int,
                tokenizer=None) -> Target:
  """The target named by `config.target`; 'tokens' uses `tokenizer` (anything with
  `vocab_size` and `__call__(images) -> (B, N) int32`) or builds the one in `config.tokenizer`."""
  kind = config.get('target', 'pixel')
  if kind == 'pixel':
    norm_pix = bool(config.get('norm_pix', True))
    return Target(lambda x: pixel_targets(x, patch_size, norm_pix), patch_size ** 2 * 3, False)
  if kind == 'hog':
    hog = hog_config(config)
    if hog.gaussian_window and hog.gaussian_window % patch_size and \
        patch_size % hog.gaussian_window:
      raise ValueError(f'config.hog.gaussian_window={hog.gaussian_window}: expected 0 or a '
                       f'divisor/multiple of the patch size {patch_size}')
    fn = lambda x: jax.lax.stop_gradient(
        hog_targets(x, patch_size, hog.nbins, hog.cell_size, hog.gaussian_window))
    return Target(fn, hog_dim(patch_size, hog.nbins, hog.cell_size), False)
  if kind == 'tokens':
    if tokenizer is None:
      from mimjax import tokenizer as tokenizer_lib
      tokenizer = tokenizer_lib.make_tokenizer(config, patch_size)
    return Target(lambda x: jax.lax.stop_gradient(tokenizer(x)), int(tokenizer.vocab_size), True)
  raise ValueError(f'config.target={kind!r}: expected one of {TARGETS}')


def target_loss(target: Target, pred: jnp.ndarray, labels: jnp.ndarray,
                weights: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Per-patch MSE (mean over dims; MaskFeat/MAE) or cross-entropy (BEiT), averaged over the
  patches with weight 1 (all patches when `weights` is None)."""
  pred = pred.astype(jnp.float32)
  if weights is None:
    weights = jnp.ones(pred.shape[:-1], jnp.float32)
  if not target.classification:
    return masked_mse(pred, labels, weights)
  per_patch = optax.softmax_cross_entropy_with_integer_labels(pred, labels.astype(jnp.int32))
  return jnp.sum(per_patch * weights) / jnp.sum(weights)
