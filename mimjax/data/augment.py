"""Host-side augmentations (numpy + PIL), matching the official torchvision pipelines.

Every function takes an explicit `np.random.Generator`. Geometric ops (crop, resize, pad, flip)
are applied jointly to the image and, when given, its `segments` id map — the map with
NEAREST resampling so ids stay ids; photometric ops (colour jitter, grayscale, blur, solarize)
never touch the map. Images are (H, W, 3) uint8, maps (H, W) uint8; `segments=None` is allowed
everywhere and passes through as None.
"""

import math
from typing import NamedTuple, Optional, Sequence

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
              size: int, photometric: bool = True) -> tuple[Array, Optional[Array]]:
  """LUT: view 1 = simple resized crop; view 2 = SRC → jitter (p .8) → 3-augment. Stacked.

  `photometric=False`: crops and flips only (the train step jitters view 2 on the device,
  mimjax.data.device_augment)."""
  v1, s1 = simple_resized_crop(rng, image, segments, size)
  v2, s2 = simple_resized_crop(rng, image, segments, size)
  if photometric:
    if rng.uniform() < 0.8:
      v2 = color_jitter(rng, v2)
    v2 = three_augment(rng, v2)
  segs = None if segments is None else np.stack([s1, s2])
  return np.stack([v1, v2]), segs


def dino_views(rng: np.random.Generator, image: Array, segments: Optional[Array],
               global_size: int, local_size: int, local_number: int,
               global_scale: Sequence[float] = (0.4, 1.0),
               local_scale: Sequence[float] = (0.05, 0.4), photometric: bool = True) -> dict:
  """DINO multi-crop: 2 global (blur 1.0 / 0.1 + solarize 0.2) and N local (blur 0.5) crops.

  `photometric=False`: crops and flips only (the train step applies the colour jitter,
  grayscale, blur and solarization on the device, mimjax.data.device_augment). Returns
  {'global': (2, G, G, 3), 'local': (N, L, L, 3)} (+ 'segments_global', 'segments_local' when
  `segments` is given).
  """
  globals_, gsegs, locals_, lsegs = [], [], [], []
  for k, (blur_p, sol_p) in enumerate(((1.0, 0.0), (0.1, 0.2))):
    del k
    v, s = random_resized_crop(rng, image, segments, global_size, global_scale)
    if photometric:
      v, s = flip_color_gray(rng, v, s)
      if rng.uniform() < blur_p:
        v = gaussian_blur(rng, v)
      if rng.uniform() < sol_p:
        v = solarize(v)
    else:
      v, s = random_hflip(rng, v, s)
    globals_.append(v)
    gsegs.append(s)
  for _ in range(local_number):
    v, s = random_resized_crop(rng, image, segments, local_size, local_scale)
    if photometric:
      v, s = flip_color_gray(rng, v, s)
      if rng.uniform() < 0.5:
        v = gaussian_blur(rng, v)
    else:
      v, s = random_hflip(rng, v, s)
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


# ------------------------------------------------------------- crops on the device (crop_on)
def fit_size(height: int, width: int, canvas_hw: Sequence[int]) -> tuple[int, int]:
  """The (h, w) an image of height × width takes on the canvas: itself when it fits, else
  shrunk to fit, aspect kept."""
  ch, cw = int(canvas_hw[0]), int(canvas_hw[1])
  if height <= ch and width <= cw:
    return height, width
  s = min(ch / height, cw / width)
  return max(1, min(ch, int(round(height * s)))), max(1, min(cw, int(round(width * s))))


def fit_to_canvas(image: Array, canvas_hw: Sequence[int], resample=BICUBIC) -> Array:
  """The image as it lies on the canvas: itself when it fits, else shrunk to fit_size."""
  return _resize(image, fit_size(image.shape[0], image.shape[1], canvas_hw), resample)


def to_canvas(image: Array, canvas_hw: Sequence[int], resample=BICUBIC,
              out: Optional[Array] = None, pad: Optional[int] = None
              ) -> tuple[Array, tuple[int, int]]:
  """(H, W[, 3]) → a fixed (h_c, w_c[, 3]) canvas: the image at its top-left (shrunk to fit
  when larger, aspect kept: `resample`, NEAREST for a segment map), edge-replicated to the right
  and bottom; → (canvas, (h, w) of the image on it). Crop boxes index the image on the canvas.
  `out`: the canvas to fill (a row of the batch: no copy of a per-image canvas).
  `pad`: edge-replicate only this many pixels right of and below the image (all a resize
  kernel reaches past a box inside it: `mimjax.data.pipeline.canvas_reach`) and zero the rest:
  each byte written once, 25 % less host CPU than replicating to the canvas's edges."""
  ch, cw = int(canvas_hw[0]), int(canvas_hw[1])
  image = fit_to_canvas(image, canvas_hw, resample)
  h, w = image.shape[:2]
  canvas = np.empty((ch, cw) + image.shape[2:], image.dtype) if out is None else out
  # = np.pad(mode='edge'), written out: three copies (2.4× less CPU), each of whole pixels or
  # rows (a broadcast assignment of a 3-byte pixel copies byte by byte: 6× slower for a
  # portrait image's right strip)
  canvas[:h, :w] = image
  right = cw - w if pad is None else min(pad, cw - w)
  below = ch - h if pad is None else min(pad, ch - h)
  if right:
    canvas[:h, w:w + right] = np.repeat(image[:, w - 1:w], right, axis=1)
  if below:
    canvas[h:h + below, :w + right] = canvas[h - 1, :w + right]
  if pad is not None:
    canvas[:h + below, w + right:] = 0
    canvas[h + below:] = 0
  return canvas, (h, w)


def crop_plan(rng: np.random.Generator, height: int, width: int, n: int,
              scale: Sequence[float], ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple:
  """n × (RandomResizedCrop box, flip): the draws `random_resized_crop` → `random_hflip` make,
  in the same order, as arrays ((n, 4) int32 top/left/h/w, (n,) bool) for the device."""
  boxes, flips = [], []
  for _ in range(n):
    boxes.append(rrc_params(rng, height, width, scale, ratio))
    flips.append(rng.uniform() < 0.5)
  return np.asarray(boxes, np.int32).reshape(n, 4), np.asarray(flips, bool)


def patch_segment_ids(segments: Array, patch_size: int, num_ids: int = 256) -> Array:
  """(..., H, W) uint8 id map → (..., H/p, W/p): the most frequent id in each p×p patch.

  Ties go to the lower id; background 0 counts like any other id (a patch that is half
  background, half id 3 gets 0). Ids ≥ `num_ids` do not vote (a patch made only of them gets
  0), as in a one-hot over `num_ids` classes. H and W must be multiples of `patch_size`.
  """
  segments = np.asarray(segments)
  *lead, h, w = segments.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f'segment map {h}x{w} is not a multiple of patch_size {p}')
  x = segments.reshape(*lead, h // p, p, w // p, p)
  x = np.moveaxis(x, -3, -2).reshape(-1, p * p)  # one row per patch
  k = min(int(segments.max(initial=0)) + 1, int(num_ids))
  if k <= 0:  # num_ids = 0: nothing votes
    return np.zeros((*lead, h // p, w // p), np.uint8)
  # One bincount over (patch, id) pairs; ids ≥ num_ids go to a discarded extra column.
  # Chunked so the count table stays ≤ 2**22 entries (a 32 MB int64 table).
  ids = np.empty(len(x), np.uint8)
  chunk = max(1, 2 ** 22 // (k + 1))
  for start in range(0, len(x), chunk):
    part = x[start:start + chunk].astype(np.intp)
    part = np.where(part < k, part, k)
    flat = part + (np.arange(len(part)) * (k + 1))[:, None]
    counts = np.bincount(flat.ravel(), minlength=len(part) * (k + 1)).reshape(len(part), k + 1)
    # argmax returns the first maximum → the lowest id among tied ones.
    ids[start:start + chunk] = counts[:, :k].argmax(axis=-1)
  return ids.reshape(*lead, h // p, w // p)


# --------------------------------------------------------------------------------- RandAugment
# timm `rand_augment_transform('rand-m9-mstd0.5-inc1')` as built by timm `create_transform` for
# MAE fine-tuning: ops from `_RAND_INCREASING_TRANSFORMS`, geometric ops with the interpolation
# of the crop (bicubic) and fill = timm `img_mean` = round(255 · IMAGENET_MEAN).
RAND_INCREASING_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
    'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
    'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
)
GEOMETRIC_OPS = frozenset({'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'})
RANDAUG_FILL = (124, 116, 104)  # = round(255 · (0.485, 0.456, 0.406)), timm's aa img_mean
_LEVEL_DENOM = 10.0  # timm: magnitude M → fractional level M / 10


class RandAugStep(NamedTuple):
  """One sampled RandAugment layer: op name, whether it fires, its magnitude and sign."""
  name: str
  apply: bool
  magnitude: float
  negate: bool


def randaug_op_args(name: str, magnitude: float, negate: bool = False) -> tuple:
  """timm `LEVEL_TO_ARG[name](magnitude)` with the random sign fixed by `negate`."""
  sign = -1.0 if negate else 1.0
  # Expressions keep timm's float evaluation order so int() truncations agree exactly.
  if name in ('AutoContrast', 'Equalize', 'Invert'):
    return ()
  if name == 'Rotate':  # degrees in [-30, 30]
    return (sign * ((magnitude / _LEVEL_DENOM) * 30.0),)
  if name == 'PosterizeIncreasing':  # bits kept: 4 → 0 as M grows
    return (4 - int((magnitude / _LEVEL_DENOM) * 4),)
  if name == 'SolarizeIncreasing':  # threshold 256 → 0 as M grows
    return (256 - min(256, int((magnitude / _LEVEL_DENOM) * 256)),)
  if name == 'SolarizeAdd':  # add in [0, 110] below threshold 128
    return (min(128, int((magnitude / _LEVEL_DENOM) * 110)),)
  if name in ('ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
              'SharpnessIncreasing'):  # enhance factor 1 ± 0.9·M/10, at least 0.1
    return (max(0.1, 1.0 + sign * ((magnitude / _LEVEL_DENOM) * 0.9)),)
  if name in ('ShearX', 'ShearY'):  # shear factor in [-0.3, 0.3]
    return (sign * ((magnitude / _LEVEL_DENOM) * 0.3),)
  if name in ('TranslateXRel', 'TranslateYRel'):  # fraction of the side in [-0.45, 0.45]
    return (sign * ((magnitude / _LEVEL_DENOM) * 0.45),)
  raise ValueError(f'unknown RandAugment op {name!r}; expected one of {RAND_INCREASING_OPS}')


def _affine(pil: Image.Image, coeffs: tuple, resample, fill) -> Image.Image:
  """PIL inverse-affine warp at the same size (output (x, y) samples input A·(x, y, 1))."""
  return pil.transform(pil.size, Image.Transform.AFFINE, coeffs, resample=resample,
                       fillcolor=fill)


def _geometric(pil: Image.Image, name: str, arg: float, resample, fill) -> Image.Image:
  """Rotate / shear / translate exactly as timm's PIL calls."""
  if name == 'Rotate':
    return pil.rotate(arg, resample=resample, fillcolor=fill)
  if name == 'ShearX':
    return _affine(pil, (1, arg, 0, 0, 1, 0), resample, fill)
  if name == 'ShearY':
    return _affine(pil, (1, 0, 0, arg, 1, 0), resample, fill)
  if name == 'TranslateXRel':
    return _affine(pil, (1, 0, arg * pil.size[0], 0, 1, 0), resample, fill)
  return _affine(pil, (1, 0, 0, 0, 1, arg * pil.size[1]), resample, fill)  # TranslateYRel


def _photometric(pil: Image.Image, name: str, args: tuple) -> Image.Image:
  """The colour ops (PIL ImageOps / ImageEnhance), as timm calls them."""
  if name == 'AutoContrast':
    return ImageOps.autocontrast(pil)
  if name == 'Equalize':
    return ImageOps.equalize(pil)
  if name == 'Invert':
    return ImageOps.invert(pil)
  if name == 'PosterizeIncreasing':  # keep the top `bits` bits of every channel
    bits = args[0]
    if bits >= 8:
      return pil
    # ImageOps.posterize's LUT, written out: recent Pillow rejects bits = 0 (M clipped to 10),
    # which older Pillow (MAE's era) mapped to an all-black image — we keep that.
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return pil.point([i & mask for i in range(256)] * len(pil.getbands()))
  if name == 'SolarizeIncreasing':
    return ImageOps.solarize(pil, args[0])
  if name == 'SolarizeAdd':  # add `args[0]` (saturating) to pixels below 128
    lut = [min(255, i + args[0]) if i < 128 else i for i in range(256)]
    return pil.point(lut * len(pil.getbands()))
  enhancer = {'ColorIncreasing': ImageEnhance.Color, 'ContrastIncreasing': ImageEnhance.Contrast,
              'BrightnessIncreasing': ImageEnhance.Brightness,
              'SharpnessIncreasing': ImageEnhance.Sharpness}[name]
  return enhancer(pil).enhance(args[0])


def randaug_op(image: Array, segments: Optional[Array], name: str, magnitude: float,
               negate: bool = False, fill: Sequence[int] = RANDAUG_FILL,
               resample=BICUBIC) -> tuple[Array, Optional[Array]]:
  """One RandAugment op at a fixed magnitude and sign; geometric ops also warp `segments`
  (NEAREST, fill 0 = background), colour ops leave it alone."""
  args = randaug_op_args(name, magnitude, negate)
  pil = Image.fromarray(image)
  if name in GEOMETRIC_OPS:
    out = np.asarray(_geometric(pil, name, args[0], resample, tuple(fill)))
    if segments is not None:
      segments = np.asarray(_geometric(Image.fromarray(segments), name, args[0], NEAREST, 0))
    return out, segments
  return np.asarray(_photometric(pil, name, args)), segments


def rand_augment_plan(rng: np.random.Generator, num_ops: int = 2, magnitude: float = 9.0,
                      magnitude_std: float = 0.5, prob: float = 0.5,
                      magnitude_max: float = _LEVEL_DENOM,
                      ops: Sequence[str] = RAND_INCREASING_OPS) -> list[RandAugStep]:
  """timm `RandAugment.__call__` draws: `num_ops` ops uniformly with replacement, each fires
  with probability `prob` with magnitude ~ N(magnitude, magnitude_std) (U(0, magnitude) when
  the std is inf or > 100, as timm's 'mstd' parsing) clipped to [0, magnitude_max], and a
  fair-coin sign (used by the signed ops only)."""
  choice = rng.integers(0, len(ops), size=num_ops)
  steps = []
  for k in choice:
    apply = bool(rng.uniform() < prob)
    m = float(magnitude)
    if magnitude_std > 100:
      m = float(rng.uniform(0.0, magnitude))
    elif magnitude_std > 0:
      m = float(rng.normal(magnitude, magnitude_std))
    m = max(0.0, min(m, magnitude_max))
    negate = bool(rng.uniform() < 0.5)
    steps.append(RandAugStep(ops[int(k)], apply, m, negate))
  return steps


def rand_augment(rng: np.random.Generator, image: Array, segments: Optional[Array],
                 num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 prob: float = 0.5) -> tuple[Array, Optional[Array]]:
  """timm RandAugment 'rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1' (bicubic)."""
  for step in rand_augment_plan(rng, num_ops, magnitude, magnitude_std, prob):
    if step.apply:
      image, segments = randaug_op(image, segments, step.name, step.magnitude, step.negate)
  return image, segments


def finetune_view(rng: np.random.Generator, image: Array, segments: Optional[Array], size: int,
                  scale: Sequence[float] = (0.08, 1.0),
                  ratio: Sequence[float] = (3 / 4, 4 / 3), num_ops: int = 2,
                  magnitude: float = 9.0,
                  magnitude_std: float = 0.5) -> tuple[Array, Optional[Array]]:
  """MAE fine-tuning (timm create_transform): RRC(size, scale, bicubic) → flip 0.5 →
  RandAugment. RandomErasing follows on device, after normalisation
  (`mimjax.data.erasing.random_erasing`)."""
  image, segments = random_resized_crop(rng, image, segments, size, scale, ratio)
  image, segments = random_hflip(rng, image, segments)
  return rand_augment(rng, image, segments, num_ops, magnitude, magnitude_std)
