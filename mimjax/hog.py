"""HOG features (MaskFeat): SlowFast's `HOGLayerC` in JAX, per-patch HOG targets and sizes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def default_hog_config() -> ml_collections.ConfigDict:
  """MaskFeat HOG: 9 bins, 8-px cells, per colour channel; window 0 = none (SlowFast image
  MaskFeat), 16 = mmpretrain's default Gaussian window (one per 16×16 patch)."""
  return ml_collections.ConfigDict({'nbins': 9, 'cell_size': 8, 'gaussian_window': 16})


def gaussian_window(size: int) -> np.ndarray:
  """SlowFast `get_gkern(size, size // 2)`: outer product of exp(−½((n − mean)/std)²), sum 1.
  """
  n = np.arange(size, dtype=np.float32)
  n = (n - n.mean()) / (size // 2)
  w = np.exp(-0.5 * n ** 2)
  k = w[:, None] * w[None, :]
  return (k / k.sum()).astype(np.float32)


def hog_cells(images: jnp.ndarray, nbins: int = 9, cell_size: int = 8,
              window: int = 0) -> jnp.ndarray:
  """SlowFast `HOGLayerC` on normalised NHWC images → (B, H/cell, W/cell, 3, nbins).

  Per colour channel: reflect-pad 1, gx = conv [[1,0,−1],[2,0,−2],[1,0,−1]], gy = its
  transpose (cross-correlation, as torch conv2d), magnitude √(gx²+gy²), bin =
  floor(atan2(gx, gy)·nbins/π) mod nbins (hard assignment), optional Gaussian window tiled
  every `window` px, sums over cell×cell cells, L2 over bins (eps 1e-12).
  """
  x = jnp.asarray(images, jnp.float32)
  b, h, w, c = x.shape
  if h % cell_size or w % cell_size:
    raise ValueError(f'HOG: image {(h, w)} not divisible by cell_size {cell_size}')
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  at = lambda di, dj: xp[:, di:di + h, dj:dj + w]
  # Terms in the 3×3 correlation's row-major order (the summation order changes ulps only).
  gx = at(0, 0) - at(0, 2) + 2 * at(1, 0) - 2 * at(1, 2) + at(2, 0) - at(2, 2)
  gy = at(0, 0) + 2 * at(0, 1) + at(0, 2) - at(2, 0) - 2 * at(2, 1) - at(2, 2)
  magnitude = jnp.sqrt(gx * gx + gy * gy)
  phase = jnp.arctan2(gx, gy) / jnp.pi * nbins  # in [−nbins, nbins]
  bins = jnp.mod(jnp.floor(phase).astype(jnp.int32), nbins)
  if window:
    if h % window or w % window:
      raise ValueError(f'HOG: image {(h, w)} not divisible by gaussian_window {window}')
    kernel = np.tile(gaussian_window(window), (h // window, w // window))
    magnitude = magnitude * jnp.asarray(kernel)[None, :, :, None]
  votes = jax.nn.one_hot(bins, nbins, dtype=jnp.float32) * magnitude[..., None]
  cells = votes.reshape(b, h // cell_size, cell_size, w // cell_size, cell_size, c, nbins)
  cells = cells.sum(axis=(2, 4))
  norm = jnp.sqrt(jnp.sum(cells * cells, axis=-1, keepdims=True))
  return cells / jnp.maximum(norm, 1e-12)


def hog_targets(images: jnp.ndarray, patch_size: int, nbins: int = 9, cell_size: int = 8,
                window: int = 0) -> jnp.ndarray:
  """MaskFeat per-patch HOG (B, N, 3·nbins·(p/cell)²), flattened (channel, bin, cell row,
  cell col) as SlowFast/mmpretrain do; 108-d for 16-px patches and 8-px cells."""
  if patch_size % cell_size:
    raise ValueError(f'HOG: patch_size {patch_size} not divisible by hog.cell_size {cell_size}')
  cells = hog_cells(images, nbins, cell_size, window)
  b, ch, cw, c, nb = cells.shape
  k = patch_size // cell_size
  x = cells.reshape(b, ch // k, k, cw // k, k, c, nb).transpose(0, 1, 3, 5, 6, 2, 4)
  return x.reshape(b, (ch // k) * (cw // k), c * nb * k * k)


def hog_dim(patch_size: int, nbins: int = 9, cell_size: int = 8) -> int:
  """Length of one patch's HOG target."""
  return 3 * nbins * (patch_size // cell_size) ** 2


# -------------------------------------------------------------------------------------- targets


def hog_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.hog` with defaults filled in."""
  out = default_hog_config()
  out.update(dict(config.get('hog') or {}))
  return out
