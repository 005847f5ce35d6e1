"""Photometric augmentations on the accelerator (JAX, batched), inside the train step.

With `data.augment_on='device'` the host pipeline does only the geometric part of the 'dino'
and 'lut' recipes (crops, flips) and ships uint8 views; the train step then applies DINO's
ColorJitter, RandomGrayscale, GaussianBlur and Solarization here, with per-image parameters
drawn from the step's key (folded for this purpose, so a resumed run redraws them exactly).
With `data.crop_on='device'` (paper rows) the step first cuts the RandomResizedCrop views from
the host's canvases, with each view's segment map and its patch ids (`crop_views`).

Numerics: for given parameters every op equals `torchvision.transforms.v2.functional` on the
same uint8 image (tests/data/test_device_augment.py checks against torch): images stay float32
arrays holding uint8 values between ops, truncated (`.to(uint8)`) or rounded (blur) at the
points where torchvision converts back to uint8. The photometric ops commute with the host's
horizontal flip (per-pixel ops; the blur kernel is symmetric with reflect padding), so moving
them after the crop+flip changes no distribution.

Parameter draws follow DINO's `DataAugmentationDINO` (torchvision ColorJitter: the four
adjustments in a uniformly random order, factors uniform in [1 − x, 1 + x], hue in [−h, h]):
ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, RandomGrayscale 0.2, GaussianBlur σ ~ U(0.1, 2)
with p 1.0 / 0.1 / 0.5 (global crop 1, global crop 2, local crops), Solarization(128) 0.2 on
global crop 2. Every draw is an array shaped like the batch's leading axes, so with
`jax_threefry_partitionable` row b's parameters depend only on (key, b): 1 and 8 devices draw
identical parameters, and each device computes only its own rows. The pixels then agree
exactly or, rarely, by one level: two compiled programs may round a float differently (an FMA
or not) just below a truncation point (tests/data/test_device_augment.py).
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections

from mimjax.data import pipeline

# DINO blurs with PIL's GaussianBlur(radius=σ), whose support is about ±3σ; torchvision needs a
# fixed odd kernel: 2·⌈3·σ_max⌉ + 1 = 13 keeps every σ ≤ 2 untruncated to 3σ.
BLUR_KERNEL_SIZE = 13
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128.0
# torchvision rgb_to_grayscale (ITU-R 601-2 luma, its rounded coefficients).
_LUMA = (0.2989, 0.587, 0.114)


class PhotometricParams(NamedTuple):
  """Per-image parameters; every field has the batch's leading shape (order: + (4,))."""
  jitter: jnp.ndarray      # bool: ColorJitter applied
  order: jnp.ndarray       # int32 (..., 4): op at each position (0 b, 1 c, 2 s, 3 h)
  brightness: jnp.ndarray  # factors, torchvision ColorJitter ranges
  contrast: jnp.ndarray
  saturation: jnp.ndarray
  hue: jnp.ndarray
  gray: jnp.ndarray        # bool: RandomGrayscale applied
  blur: jnp.ndarray        # bool: GaussianBlur applied
  sigma: jnp.ndarray       # blur σ
  solarize: jnp.ndarray    # bool: Solarization applied


# ------------------------------------------------------------------------------------ numerics
def _as_uint8(x: jnp.ndarray) -> jnp.ndarray:
  """torch `clamp_(0, 255).to(uint8)` of a float: clamp, then truncate toward zero."""
  return jnp.floor(jnp.clip(x, 0.0, 255.0))


def _per_image(f: jnp.ndarray) -> jnp.ndarray:
  """(...,) per-image value → (..., 1, 1, 1) to broadcast over (H, W, C)."""
  return jnp.asarray(f, jnp.float32)[..., None, None, None]


def _luma(x: jnp.ndarray) -> jnp.ndarray:
  """(..., H, W, 3) → (..., H, W, 1) float grayscale, torchvision's coefficients and order."""
  r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
  return r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]


def _blend(x: jnp.ndarray, y: jnp.ndarray, ratio: jnp.ndarray) -> jnp.ndarray:
  """torchvision `_blend` on uint8: x·r + y·(1 − r), clamped and truncated."""
  r = _per_image(ratio)
  return _as_uint8(x * r + y * (1.0 - r))


def adjust_brightness(x: jnp.ndarray, factor: jnp.ndarray) -> jnp.ndarray:
  """F.adjust_brightness: x·factor."""
  return _as_uint8(x * _per_image(factor))


def adjust_contrast(x: jnp.ndarray, factor: jnp.ndarray) -> jnp.ndarray:
  """F.adjust_contrast: blend with the mean of the (floored) grayscale image."""
  mean = jnp.mean(jnp.floor(_luma(x)), axis=(-3, -2, -1), keepdims=True)
  return _blend(x, mean, factor)


def adjust_saturation(x: jnp.ndarray, factor: jnp.ndarray) -> jnp.ndarray:
  """F.adjust_saturation: blend with the (floored) grayscale image."""
  return _blend(x, jnp.floor(_luma(x)), factor)


def _rgb_to_hsv(rgb: jnp.ndarray) -> jnp.ndarray:
  """torchvision `_rgb_to_hsv` on [0, 1] floats (Pillow's formulas)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc, minc = jnp.max(rgb, axis=-1), jnp.min(rgb, axis=-1)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / jnp.where(eqc, 1.0, maxc)
  div = jnp.where(eqc, 1.0, cr)
  rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
  neq_r, eq_g = maxc != r, maxc == g
  hr = jnp.where(~neq_r, bc - gc, 0.0)
  hg = jnp.where(eq_g & neq_r, 2.0 + rc - bc, 0.0)
  hb = jnp.where(neq_r & ~eq_g, 4.0 + gc - rc, 0.0)
  h = jnp.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def _hsv_to_rgb(hsv: jnp.ndarray) -> jnp.ndarray:
  """torchvision `_hsv_to_rgb`: sector i = ⌊6h⌋ picks (v, p, q, t) per channel."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  h6 = h * 6.0
  i = jnp.floor(h6)
  f = h6 - i
  i = jnp.mod(i.astype(jnp.int32), 6)
  q = jnp.clip((1.0 - s * f) * v, 0.0, 1.0)
  t = jnp.clip((s * f + (1.0 - s)) * v, 0.0, 1.0)
  p = jnp.clip((1.0 - s) * v, 0.0, 1.0)
  vpqt = jnp.stack([v, p, q, t], axis=-1)
  # torchvision's select table: channel c of sector i takes vpqt[select[c][i]].
  select = jnp.array([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], jnp.int32)
  idx = jnp.moveaxis(select[:, i], 0, -1)  # (..., 3)
  return jnp.take_along_axis(vpqt, idx, axis=-1)


def adjust_hue(x: jnp.ndarray, factor: jnp.ndarray) -> jnp.ndarray:
  """F.adjust_hue: to [0, 1] floats, rotate H in HSV by `factor`, back to uint8
  (torchvision's to_dtype: ·(255 + 1 − 1e-3), truncated)."""
  hsv = _rgb_to_hsv(x * (1.0 / 255.0))
  h = jnp.mod(hsv[..., 0] + jnp.asarray(factor, jnp.float32)[..., None, None], 1.0)
  rgb = _hsv_to_rgb(jnp.stack([h, hsv[..., 1], hsv[..., 2]], axis=-1))
  return jnp.floor(rgb * (256.0 - 1e-3))


def rgb_to_grayscale(x: jnp.ndarray) -> jnp.ndarray:
  """F.rgb_to_grayscale(num_output_channels=3): truncated luma on all three channels."""
  return jnp.broadcast_to(jnp.floor(_luma(x)), x.shape)


def solarize(x: jnp.ndarray, threshold: float = SOLARIZE_THRESHOLD) -> jnp.ndarray:
  """F.solarize: invert the values ≥ threshold."""
  return jnp.where(x >= threshold, 255.0 - x, x)


def gaussian_kernel(sigma: jnp.ndarray, kernel_size: int = BLUR_KERNEL_SIZE) -> jnp.ndarray:
  """(...,) σ → (..., k) torchvision `_get_gaussian_kernel1d`: exp(−i²/2σ²), normalised."""
  i = jnp.arange(kernel_size, dtype=jnp.float32) - (kernel_size - 1) / 2
  logits = -(i / jnp.asarray(sigma, jnp.float32)[..., None]) ** 2 / 2.0
  return jax.nn.softmax(logits, axis=-1)


def gaussian_blur(x: jnp.ndarray, sigma: jnp.ndarray,
                  kernel_size: int = BLUR_KERNEL_SIZE) -> jnp.ndarray:
  """F.gaussian_blur(kernel_size, σ) per image: separable, reflect padding, rounded."""
  w = gaussian_kernel(sigma, kernel_size)
  pad = kernel_size // 2
  h_axis, w_axis = x.ndim - 3, x.ndim - 2
  for axis in (w_axis, h_axis):  # torchvision convolves with the 2-D outer-product kernel
    widths = [(0, 0)] * x.ndim
    widths[axis] = (pad, pad)
    xp = jnp.pad(x, widths, mode='reflect')
    n = x.shape[axis]
    taps = w[..., None, None, None, :]
    x = sum(jax.lax.slice_in_dim(xp, k, k + n, axis=axis) * taps[..., k]
            for k in range(kernel_size))
  return jnp.round(x)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: jnp.ndarray, p: PhotometricParams) -> jnp.ndarray:
  """torchvision ColorJitter with each image's own factors and order (where p.jitter)."""
  factors = (p.brightness, p.contrast, p.saturation, p.hue)
  y = x
  for position in range(4):
    op = p.order[..., position]
    out = y
    for index, (fn, factor) in enumerate(zip(_JITTER_OPS, factors)):
      out = jnp.where(_per_image(op == index), fn(y, factor), out)
    y = out
  return jnp.where(_per_image(p.jitter), y, x)


def apply(images: jnp.ndarray, p: PhotometricParams) -> jnp.ndarray:
  """uint8 (..., H, W, 3) → uint8: jitter → grayscale → blur → solarize, each where drawn."""
  x = jnp.asarray(images, jnp.float32)
  x = color_jitter(x, p)
  x = jnp.where(_per_image(p.gray), rgb_to_grayscale(x), x)
  # A σ of 0 would divide by zero in images whose blur is off; they keep x anyway.
  x = jnp.where(_per_image(p.blur), gaussian_blur(x, jnp.maximum(p.sigma, 1e-3)), x)
  x = jnp.where(_per_image(p.solarize), solarize(x), x)
  return x.astype(jnp.uint8)


# ------------------------------------------------------------------------------ the parameters
def sample_params(key: jax.Array, shape: tuple, *, blur_p, solarize_p=0.0, gray_p=0.2,
                  jitter_p: float = 0.8, brightness: float = 0.4, contrast: float = 0.4,
                  saturation: float = 0.2, hue: float = 0.1,
                  sigma: tuple = BLUR_SIGMA) -> PhotometricParams:
  """DataAugmentationDINO's draws for images of leading shape `shape` (probabilities
  broadcast against it, e.g. (1, 2) per global crop)."""
  keys = jax.random.split(key, 10)
  u = lambda k: jax.random.uniform(k, shape)
  factor = lambda k, x: jax.random.uniform(k, shape, minval=max(0.0, 1 - x), maxval=1 + x)
  return PhotometricParams(
      jitter=u(keys[0]) < jitter_p,
      # argsort of iid uniforms: a uniformly random permutation (torch.randperm(4)).
      order=jnp.argsort(jax.random.uniform(keys[1], shape + (4,)), axis=-1).astype(jnp.int32),
      brightness=factor(keys[2], brightness), contrast=factor(keys[3], contrast),
      saturation=factor(keys[4], saturation),
      hue=jax.random.uniform(keys[5], shape, minval=-hue, maxval=hue),
      gray=u(keys[6]) < gray_p,
      blur=u(keys[7]) < jnp.asarray(blur_p, jnp.float32),
      sigma=jax.random.uniform(keys[8], shape, minval=sigma[0], maxval=sigma[1]),
      solarize=u(keys[9]) < jnp.asarray(solarize_p, jnp.float32))


def dino_params(key: jax.Array, batch: int, num_local: int) -> tuple:
  """(global crops' params (batch, 2), local crops' params (batch, num_local))."""
  gkey, lkey = jax.random.split(key)
  return (sample_params(gkey, (batch, 2), blur_p=jnp.array([[1.0, 0.1]]),
                        solarize_p=jnp.array([[0.0, 0.2]])),
          sample_params(lkey, (batch, num_local), blur_p=0.5))


def lut_params(key: jax.Array, batch: int) -> PhotometricParams:
  """LUT view 2: ColorJitter (p 0.8), then DeiT-III 3-augment: exactly one of grayscale /
  solarize / blur, chosen uniformly."""
  p = sample_params(key, (batch,), blur_p=1.0)
  choice = jax.random.randint(jax.random.fold_in(key, 3), (batch,), 0, 3)
  return p._replace(gray=choice == 0, solarize=choice == 1, blur=choice == 2)


def dino(batch: dict, key: jax.Array) -> dict:
  """A 'dino' batch of host crops+flips → the same with DINO's photometric augmentations."""
  b = batch['global'].shape[0]
  local = batch.get('local')
  num_local = 0 if local is None else local.shape[1]
  gp, lp = dino_params(key, b, num_local)
  out = dict(batch, **{'global': apply(batch['global'], gp)})
  if num_local:
    out['local'] = apply(local, lp)
  return out


def lut(batch: dict, key: jax.Array) -> dict:
  """A 'lut' batch (B, 2, H, W, 3) → view 2 jittered and 3-augmented (view 1 untouched)."""
  images = batch['image']
  view2 = apply(images[:, 1], lut_params(key, images.shape[0]))
  return dict(batch, image=jnp.stack([images[:, 0], view2], axis=1))


RECIPES = {'dino': dino, 'lut': lut}


# ------------------------------------------------------------------ crops on the device (crop_on)
def resized_crop(canvas: jnp.ndarray, box: jnp.ndarray, flip: jnp.ndarray,
                 size: int) -> jnp.ndarray:
  """One (H, W, 3) canvas, box (top, left, h, w), flip → the size×size view, uint8: bicubic
  (Keys a = −0.5, PIL's) with antialiasing, as torchvision's PIL resized_crop + hflip. Unlike
  PIL (which crops first), the kernel near the box's edge also reads the pixels just outside
  it: measured vs PIL, mean 0.19 levels, 99th percentile 1, ≤ 2 inside a 3-px border (up to 10
  on that border) — tests/data/test_device_augment.py."""
  top, left, h, w = (box[i].astype(jnp.float32) for i in range(4))
  scale = jnp.stack([size / h, size / w])
  out = jax.image.scale_and_translate(
      jnp.asarray(canvas, jnp.float32), (size, size, canvas.shape[-1]), (0, 1), scale,
      -jnp.stack([top, left]) * scale, method='cubic', antialias=True)
  out = jnp.where(flip, out[:, ::-1], out)
  return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


def nearest_crop(segments: jnp.ndarray, box: jnp.ndarray, flip: jnp.ndarray,
                 size: int) -> jnp.ndarray:
  """One (H, W) segment map, box, flip → the size×size map: crop, NEAREST resize (output pixel
  x samples source pixel ⌊(x + ½)·w / size⌋, computed exactly in integers), flip. PIL's NEAREST
  accumulates that position in doubles: where it falls exactly on a pixel boundary
  ((2x + 1)·w a multiple of 2·size) PIL may take the pixel before it; nowhere else do they
  differ (tests/data/test_device_augment.py)."""
  def rows(start, extent, n):
    i = jnp.arange(n, dtype=jnp.int32)
    return start + ((2 * i + 1) * extent) // (2 * n)
  out = jnp.take(segments, rows(box[0], box[2], size), axis=0)
  out = jnp.take(out, rows(box[1], box[3], size), axis=1)
  return jnp.where(flip, out[:, ::-1], out)


def patch_ids(segments: jnp.ndarray, patch_size: int, num_ids: int) -> jnp.ndarray:
  """(..., H, W) id maps → (..., H/p · W/p) uint8: the most frequent id in each p×p patch, ties
  to the lower id, ids ≥ num_ids not voting (0 when none votes) — exactly
  mimjax.data.augment.patch_segment_ids, the host's rule."""
  *lead, h, w = segments.shape
  p = patch_size
  if num_ids <= 0:  # nothing votes
    return jnp.zeros((*lead, (h // p) * (w // p)), jnp.uint8)
  x = segments.reshape(*lead, h // p, p, w // p, p)

  # One id at a time, keeping the running best: XLA:CPU materialises a one-hot over
  # (…, N, p², num_ids) (808 MB of scratch for 512 maps at 224/16 with 8 ids, 25 GB with 256);
  # this loop fuses each compare into its sum (1 MB there, any num_ids).
  def vote(k, best):
    count, winner = best
    c = jnp.sum(x == k.astype(x.dtype), axis=(-3, -1), dtype=jnp.uint16)  # p² ≤ 65535
    more = c > count  # strictly: a tie keeps the lower id
    return jnp.where(more, c, count), jnp.where(more, k, winner)

  zeros = jnp.zeros((*lead, h // p, w // p), jnp.int32)
  _, winner = jax.lax.fori_loop(0, num_ids, vote, (zeros.astype(jnp.uint16), zeros))
  return winner.reshape(*lead, -1).astype(jnp.uint8)


def crop_views(batch: dict, data_config: ml_collections.ConfigDict) -> dict:
  """A crop_on='device' batch (`canvas`, `boxes_*`, `flips_*`, maybe `canvas_segments`) → what
  the host path ships ('mae': `image` (B, S, S, 3); 'dino': `global` (B, 2, G, G, 3), `local`
  (B, n, L, L, 3); with a map, each view's `segment_ids*` (B, [n,] N) when
  data.segment_patch_size > 0, else its `segments*` map)."""
  out = {k: v for k, v in batch.items()
         if not k.startswith(('canvas', 'boxes_', 'flips_'))}
  sizes = {'image': data_config.image_size, 'global': data_config.image_size,
           'local': data_config.local_size}
  maps = batch.get('canvas_segments')
  p = data_config.get('segment_patch_size', 0)
  for key, size in sizes.items():
    if f'boxes_{key}' not in batch:
      continue

    def cut(fn, source, key=key, size=size):
      one = lambda c, b, f: fn(c, b, f, size)
      views = jax.vmap(jax.vmap(one, (None, 0, 0)))(source, batch[f'boxes_{key}'],
                                                    batch[f'flips_{key}'])
      return views[:, 0] if key == 'image' else views  # 'mae': one view per image

    out[key] = cut(resized_crop, batch['canvas'])
    if maps is not None:
      seg_key = 'segments' if key == 'image' else f'segments_{key}'
      seg = cut(nearest_crop, maps)
      if p:  # as pipeline.to_patch_ids does on the host
        seg_key, seg = pipeline.segment_ids_key(seg_key), patch_ids(
            seg, p, data_config.get('segment_num_ids', 256))
      out[seg_key] = seg
  return out


def for_config(data_config: ml_collections.ConfigDict) -> Optional[Callable[[dict, jax.Array],
                                                                            dict]]:
  """The train step's device augmentation for this data config, or None (host does it all)."""
  photometric = (RECIPES[data_config.augment] if pipeline.photometric_on_device(data_config)
                 else None)
  if not pipeline.crops_on_device(data_config):
    return photometric

  def crops_then_photometric(batch: dict, key: jax.Array) -> dict:
    batch = crop_views(batch, data_config)
    return batch if photometric is None else photometric(batch, key)

  return crops_then_photometric


def objective_example(data_config: ml_collections.ConfigDict, example: dict) -> dict:
  """A host example batch as the objective sees it (after any device crops): what objective
  init needs. The identity unless crop_on='device'."""
  if not pipeline.crops_on_device(data_config):
    return example
  return jax.device_get(jax.jit(lambda b: crop_views(b, data_config))(example))
