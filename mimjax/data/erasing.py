"""timm `RandomErasing` on device (MAE fine-tuning: p 0.25, mode 'pixel', count 1).

timm erases after `Normalize`, per example, with Python `random`: with probability p, for each
of `count` boxes (count ~ U{min_count..max_count}, area range divided by count) up to 10
attempts draw area ~ U(min_area, max_area)·H·W/count and aspect ~ exp(U(log a, log 1/a)),
h = round(√(area·aspect)), w = round(√(area/aspect)); the first attempt with h < H and w < W
is placed at top ~ U{0..H−h}, left ~ U{0..W−w} and filled with N(0, 1) noise (per pixel and
channel for 'pixel', per channel for 'rand', zeros for 'const'). Here the same draws come from
an explicit JAX key, vectorised over the batch and all attempts; `erasing_boxes` maps given
uniforms to boxes so the box logic can be checked against timm's loop.
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp

MODES = ('pixel', 'rand', 'const')
ATTEMPTS = 10  # timm's fixed number of tries per box


def erasing_boxes(u_apply: jnp.ndarray, u_count: jnp.ndarray, u_area: jnp.ndarray,
                  u_aspect: jnp.ndarray, u_top: jnp.ndarray, u_left: jnp.ndarray,
                  height: int, width: int, *, probability: float, min_area: float = 0.02,
                  max_area: float = 1 / 3, min_aspect: float = 0.3,
                  max_aspect: Optional[float] = None, min_count: int = 1,
                  max_count: int = 1) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Uniforms in [0, 1) → (active (B, K) bool, boxes (B, K, 4) int32 top/left/h/w), K =
  max_count.

  Shapes: u_apply, u_count (B,); u_area, u_aspect (B, K, ATTEMPTS); u_top, u_left (B, K).
  A box is active when the example is erased (u_apply < p), k < its count and one of its
  attempts fits; it uses the first attempt that fits (timm's `break`).
  """
  max_aspect = max_aspect or 1 / min_aspect
  log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
  count = min_count + jnp.floor(u_count * (max_count - min_count + 1)).astype(jnp.int32)
  count = jnp.minimum(count, max_count)  # guards u == 1 - ulp rounding up in float32
  area = height * width
  target = (min_area + (max_area - min_area) * u_area) * area / count[:, None, None]
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u_aspect)
  # jnp.round rounds half to even, like Python's round().
  h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (w < width) & (h < height)
  first = jnp.argmax(fits, axis=-1)  # first fitting attempt (0 when none fits)
  h = jnp.take_along_axis(h, first[..., None], -1)[..., 0]
  w = jnp.take_along_axis(w, first[..., None], -1)[..., 0]
  top = jnp.floor(u_top * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(u_left * (width - w + 1)).astype(jnp.int32)
  top, left = jnp.minimum(top, height - h), jnp.minimum(left, width - w)
  k = jnp.arange(max_count)[None, :]
  active = (u_apply < probability)[:, None] & (k < count[:, None]) & fits.any(-1)
  return active, jnp.stack([top, left, h, w], axis=-1)


def random_erasing(rng: jax.Array, images: jnp.ndarray, *, probability: float = 0.25,
                   mode: str = 'pixel', min_count: int = 1, max_count: int = 1,
                   min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3) -> jnp.ndarray:
  """timm RandomErasing of normalised (B, H, W, C) images; boxes filled per `mode`."""
  if mode not in MODES:
    raise ValueError(f'random erasing mode must be one of {MODES}, got {mode!r}')
  if not 1 <= min_count <= max_count:
    raise ValueError(f'random erasing needs 1 <= min_count <= max_count, got '
                     f'{min_count}, {max_count}')
  if probability <= 0:
    return images
  b, height, width, c = images.shape
  keys = jax.random.split(rng, 8)
  u = lambda key, shape: jax.random.uniform(key, shape, jnp.float32)
  active, boxes = erasing_boxes(
      u(keys[0], (b,)), u(keys[1], (b,)), u(keys[2], (b, max_count, ATTEMPTS)),
      u(keys[3], (b, max_count, ATTEMPTS)), u(keys[4], (b, max_count)),
      u(keys[5], (b, max_count)), height, width, probability=probability, min_area=min_area,
      max_area=max_area, min_aspect=min_aspect, min_count=min_count, max_count=max_count)
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  noise_keys = jax.random.split(keys[6], max_count)
  for k in range(max_count):  # sequential: a later box overwrites an earlier one, as in timm
    top, left, h, w = (boxes[:, k, i][:, None, None] for i in range(4))
    inside = ((rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
              & active[:, k][:, None, None])
    if mode == 'pixel':
      fill = jax.random.normal(noise_keys[k], images.shape, images.dtype)
    elif mode == 'rand':
      fill = jax.random.normal(noise_keys[k], (b, 1, 1, c), images.dtype)
    else:
      fill = jnp.zeros((), images.dtype)
    images = jnp.where(inside[..., None], fill, images)
  return images
