"""Host-side augmentations (numpy + PIL), matching the official torchvision pipelines.

Every function takes an explicit `np.random.Generator`. Geometric ops (crop, resize, pad, flip)
are applied jointly to the image and, when given, its `segments` id map — the map with
NEAREST resampling so ids stay ids; photometric ops (colour jitter, grayscale, blur, solarize)
never touch the map. Images are (H, W, 3) uint8, maps (H, W) uint8; `segments=None` is allowed
everywhere and passes through as None.
"""

import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

Array = np.ndarray
Box = tuple[int, int, int, int]  # (top, left, height, width)

BICUBIC = Image.Resampling.BICUBIC
BILINEAR = Image.Resampling.BILINEAR
NEAREST = Image.Resampling.NEAREST


def _resize(x: Array, size_hw: tuple[int, int], resample) -> Array:
  """PIL resize of an (H, W[, 3]) uint8 array to (h, w)."""
  if x.shape[:2] == tuple(size_hw):
    return x
  return np.asarray(Image.fromarray(x).resize((size_hw[1], size_hw[0]), resample))


def resized_crop(image: Array, segments: Optional[Array], box: Box, size: int,
                 resample=BICUBIC) -> tuple[Array, Optional[Array]]:
  """Crops `box` and resizes to size×size (torchvision F.resized_crop); map uses NEAREST."""
  top, left, h, w = box
  image = _resize(image[top:top + h, left:left + w], (size, size), resample)
  if segments is not None:
    segments = _resize(segments[top:top + h, left:left + w], (size, size), NEAREST)
  return image, segments


def rrc_params(rng: np.random.Generator, height: int, width: int,
               scale: Sequence[float] = (0.08, 1.0),
               ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Box:
  """torchvision RandomResizedCrop.get_params: 10 tries, then the centre-crop fallback."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(rng: np.random.Generator, image: Array, segments: Optional[Array],
                        size: int, scale: Sequence[float] = (0.2, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        resample=BICUBIC) -> tuple[Array, Optional[Array]]:
  """torchvision RandomResizedCrop(size, scale, ratio, bicubic) on image and map."""
  box = rrc_params(rng, image.shape[0], image.shape[1], scale, ratio)
  return resized_crop(image, segments, box, size, resample)


def hflip(image: Array, segments: Optional[Array]) -> tuple[Array, Optional[Array]]:
  """Mirror left↔right."""
  return image[:, ::-1], (None if segments is None else segments[:, ::-1])


def random_hflip(rng: np.random.Generator, image: Array, segments: Optional[Array],
                 p: float = 0.5) -> tuple[Array, Optional[Array]]:
  """Flip with probability p."""
  return hflip(image, segments) if rng.uniform() < p else (image, segments)


def resize_shorter(image: Array, segments: Optional[Array], size: int,
                   resample=BICUBIC) -> tuple[Array, Optional[Array]]:
  """torchvision Resize(int): shorter side → size, longer side int(size·long/short)."""
  h, w = image.shape[:2]
  if h <= w:
    new = (size, int(size * w / h))
  else:
    new = (int(size * h / w), size)
  image = _resize(image, new, resample)
  return image, (None if segments is None else _resize(segments, new, NEAREST))


def center_crop(image: Array, segments: Optional[Array],
                size: int) -> tuple[Array, Optional[Array]]:
  """torchvision CenterCrop (image at least size×size)."""
  h, w = image.shape[:2]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  sl = (slice(top, top + size), slice(left, left + size))
  return image[sl], (None if segments is None else segments[sl])


def random_crop_padded(rng: np.random.Generator, image: Array, segments: Optional[Array],
                       size: int, padding: int = 4) -> tuple[Array, Optional[Array]]:
  """torchvision RandomCrop(size, padding, padding_mode='reflect')."""
  if padding:
    pad = ((padding, padding), (padding, padding))
    image = np.pad(image, pad + ((0, 0),), mode='reflect')
    if segments is not None:
      segments = np.pad(segments, pad, mode='reflect')
  h, w = image.shape[:2]
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  sl = (slice(top, top + size), slice(left, left + size))
  return image[sl], (None if segments is None else segments[sl])


def simple_resized_crop(rng: np.random.Generator, image: Array, segments: Optional[Array],
                        size: int, padding: int = 4) -> tuple[Array, Optional[Array]]:
  """DeiT-III simple random crop: Resize(shorter=size, bicubic) → RandomCrop(pad 4) → flip."""
  image, segments = resize_shorter(image, segments, size)
  image, segments = random_crop_padded(rng, image, segments, size, padding)
  return random_hflip(rng, image, segments)


# ----------------------------------------------------------------------- photometric (image only)
def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
  """torchvision F.adjust_hue for PIL: shift H in HSV by hue_factor·255 (uint8 wrap)."""
  h, s, v = image.convert('HSV').split()
  shift = int(hue_factor * 255) % 256  # torchvision's np.uint8(hue_factor * 255) wrap-around
  h = Image.fromarray((np.asarray(h, np.uint8) + np.uint8(shift)).astype(np.uint8), 'L')
  return Image.merge('HSV', (h, s, v)).convert('RGB')


def color_jitter(rng: np.random.Generator, image: Array, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1) -> Array:
  """torchvision ColorJitter: the four adjustments in a random order, factors uniform."""
  pil = Image.fromarray(image)
  order = rng.permutation(4)
  b = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
  c = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
  s = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
  h = rng.uniform(-hue, hue)
  for op in order:
    if op == 0:
      pil = ImageEnhance.Brightness(pil).enhance(b)
    elif op == 1:
      pil = ImageEnhance.Contrast(pil).enhance(c)
    elif op == 2:
      pil = ImageEnhance.Color(pil).enhance(s)
    else:
      pil = adjust_hue(pil, h)
  return np.asarray(pil)


def grayscale(image: Array) -> Array:
  """PIL 'L' conversion (ITU-R 601-2 luma) replicated to 3 channels."""
  g = np.asarray(Image.fromarray(image).convert('L'))
  return np.repeat(g[..., None], 3, axis=-1)


def solarize(image: Array, threshold: int = 128) -> Array:
  """PIL ImageOps.solarize: invert pixels ≥ threshold."""
  return np.asarray(ImageOps.solarize(Image.fromarray(image), threshold))


def gaussian_blur(rng: np.random.Generator, image: Array,
                  radius: Sequence[float] = (0.1, 2.0)) -> Array:
  """PIL GaussianBlur with radius ~ U(radius) (DINO / DeiT-III)."""
  r = rng.uniform(radius[0], radius[1])
  return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=r)))


def three_augment(rng: np.random.Generator, image: Array) -> Array:
  """DeiT-III 3-augment: exactly one of grayscale / solarize / blur, chosen uniformly."""
  choice = int(rng.integers(0, 3))
  if choice == 0:
    return grayscale(image)
  if choice == 1:
    return solarize(image)
  return gaussian_blur(rng, image)


def flip_color_gray(rng: np.random.Generator, image: Array, segments: Optional[Array],
                    jitter_p: float = 0.8, gray_p: float = 0.2) -> tuple[Array, Optional[Array]]:
  """DINO's shared block: flip 0.5 → ColorJitter(.4,.4,.2,.1) w.p. 0.8 → grayscale w.p. 0.2."""
  image, segments = random_hflip(rng, image, segments)
  if rng.uniform() < jitter_p:
    image = color_jitter(rng, image)
  if rng.uniform() < gray_p:
    image = grayscale(image)
  return image, segments


# -------------------------------------------------------------------------------- full recipes
def mae_view(rng: np.random.Generator, image: Array, segments: Optional[Array], size: int,
             scale: Sequence[float] = (0.2, 1.0)) -> tuple[Array, Optional[Array]]:
  """MAE pretraining: RandomResizedCrop(size, scale, bicubic) → horizontal flip 0.5."""
  image, segments = random_resized_crop(rng, image, segments, size, scale)
  return random_hflip(rng, image, segments)


def eval_view(image: Array, segments: Optional[Array], size: int,
              crop_pct: float = 0.875) -> tuple[Array, Optional[Array]]:
  """Evaluation: Resize(shorter = int(size / crop_pct), bicubic) → CenterCrop(size)."""
  image, segments = resize_shorter(image, segments, int(size / crop_pct))
  return center_crop(image, segments, size)


def resize_view(image: Array, segments: Optional[Array],
                size: int) -> tuple[Array, Optional[Array]]:
  """No augmentation: squash to size×size (bicubic; identity when already that size)."""
  image = _resize(image, (size, size), BICUBIC)
  return image, (None if segments is None else _resize(segments, (size, size), NEAREST))


def lut_views(rng: np.random.Generator, image: Array, segments: Optional[Array],
              size: int) -> tuple[Array, Optional[Array]]:
  """LUT: view 1 = simple resized crop; view 2 = SRC → jitter (p .8) → 3-augment. Stacked."""
  v1, s1 = simple_resized_crop(rng, image, segments, size)
  v2, s2 = simple_resized_crop(rng, image, segments, size)
  if rng.uniform() < 0.8:
    v2 = color_jitter(rng, v2)
  v2 = three_augment(rng, v2)
  segs = None if segments is None else np.stack([s1, s2])
  return np.stack([v1, v2]), segs


def dino_views(rng: np.random.Generator, image: Array, segments: Optional[Array],
               global_size: int, local_size: int, local_number: int,
               global_scale: Sequence[float] = (0.4, 1.0),
               local_scale: Sequence[float] = (0.05, 0.4)) -> dict:
  """DINO multi-crop: 2 global (blur 1.0 / 0.1 + solarize 0.2) and N local (blur 0.5) crops.

  Returns {'global': (2, G, G, 3), 'local': (N, L, L, 3)} (+ 'segments_global',
  'segments_local' when `segments` is given).
  """
  globals_, gsegs, locals_, lsegs = [], [], [], []
  for k, (blur_p, sol_p) in enumerate(((1.0, 0.0), (0.1, 0.2))):
    del k
    v, s = random_resized_crop(rng, image, segments, global_size, global_scale)
    v, s = flip_color_gray(rng, v, s)
    if rng.uniform() < blur_p:
      v = gaussian_blur(rng, v)
    if rng.uniform() < sol_p:
      v = solarize(v)
    globals_.append(v)
    gsegs.append(s)
  for _ in range(local_number):
    v, s = random_resized_crop(rng, image, segments, local_size, local_scale)
    v, s = flip_color_gray(rng, v, s)
    if rng.uniform() < 0.5:
      v = gaussian_blur(rng, v)
    locals_.append(v)
    lsegs.append(s)
  out = {'global': np.stack(globals_),
         'local': (np.stack(locals_) if locals_
                   else np.zeros((0, local_size, local_size, 3), np.uint8))}
  if segments is not None:
    out['segments_global'] = np.stack(gsegs)
    out['segments_local'] = (np.stack(lsegs) if lsegs
                             else np.zeros((0, local_size, local_size), np.uint8))
  return out


def patch_segment_ids(segments: Array, patch_size: int) -> Array:
  """(..., H, W) uint8 id map → (..., H/p, W/p): the most frequent id in each p×p patch.

  Ties go to the lower id; background 0 counts like any other id (a patch that is half
  background, half id 3 gets 0). H and W must be multiples of `patch_size`.
  """
  segments = np.asarray(segments)
  *lead, h, w = segments.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f'segment map {h}x{w} is not a multiple of patch_size {p}')
  x = segments.reshape(*lead, h // p, p, w // p, p)
  x = np.moveaxis(x, -3, -2).reshape(*lead, h // p, w // p, p * p)
  ids = np.arange(int(segments.max(initial=0)) + 1, dtype=segments.dtype)
  counts = (x[..., None] == ids).sum(axis=-2)  # (..., h/p, w/p, K+1)
  # argmax returns the first maximum → the lowest id among tied ones.
  return counts.argmax(axis=-1).astype(np.uint8)
