"""Embedded data sets built from data that ships with installed packages (no downloads).

- `digits`: scikit-learn's `load_digits` (1797 8×8 grayscale, values 0..16) scaled to 0..255,
  upsampled ×4 with **nearest** neighbour to 32×32 (keeps the pixel grid exact), replicated to
  RGB; a fixed permutation (numpy `default_rng(0)`) puts the first 1500 into `train` and the
  remaining 297 into `test`.
- `photos`: scikit-image sample images at native size (grayscale ones converted to RGB),
  label = index in `PHOTOS`; one split, `train`.
"""

import os
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from mimjax.data.builders import tfds_io

EMBEDDED = ('digits', 'photos')
DIGITS_TRAIN = 1500
DIGITS_SEED = 0
# Bumped whenever an embedded set's content changes, so stale caches are rebuilt.
VERSIONS = {'digits': '1.1.0', 'photos': tfds_io.VERSION}
# scikit-image sample images that are bundled with the wheel (no pooch download).
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field',
          'immunohistochemistry', 'retina', 'colorwheel', 'camera', 'moon', 'page', 'coins',
          'clock', 'text', 'grass', 'gravel', 'brick', 'cell')


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, 32, 32, 3) uint8, labels (N,) int64) of the digits `split`."""
  from sklearn.datasets import load_digits  # heavy import, only when building
  d = load_digits()
  perm = np.random.default_rng(DIGITS_SEED).permutation(len(d.images))
  idx = {'train': perm[:DIGITS_TRAIN], 'test': perm[DIGITS_TRAIN:]}[split]
  small = np.round(d.images[idx] * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
  # Bicubic, not nearest: with nearest every 4×4 patch of the 32-px image would be one flat
  # pixel, whose norm-pix MAE target is all zeros — nothing to learn.
  big = np.stack([np.asarray(Image.fromarray(x).resize((32, 32), Image.BICUBIC)) for x in small])
  return np.repeat(big[..., None], 3, axis=-1), d.target[idx].astype(np.int64)


def photo_array(name: str) -> np.ndarray:
  """One scikit-image sample as (H, W, 3) uint8."""
  import skimage.data
  img = np.asarray(getattr(skimage.data, name)())
  if img.dtype == bool:
    img = img.astype(np.uint8) * 255
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  return np.ascontiguousarray(img[..., :3].astype(np.uint8))


# ImageNet-like sizes (the common 500×375 / 375×500 / 500×333, 640×480, some 1024×768).
JPEG_SIZES = ((500, 375), (375, 500), (500, 333), (640, 480), (500, 375), (1024, 768))


def write_photo_jpegs(out_dir: str, count: int = 300, quality: int = 90, seed: int = 0) -> int:
  """`count` JPEGs at ImageNet sizes cut from the scikit-image photos (random crops of the 18
  samples, bicubic to JPEG_SIZES in turn), as out_dir/class_{i % 2}/{i:04d}.jpg: an image
  folder for input-pipeline benchmarks (docs/performance.md). Returns the number written."""
  rng = np.random.default_rng(seed)
  photos = [photo_array(name) for name in PHOTOS]
  for i in range(count):
    img = photos[i % len(photos)]
    w, h = JPEG_SIZES[i % len(JPEG_SIZES)]
    ih, iw = img.shape[:2]
    # the largest crop of the target's aspect ratio, scaled by U(0.5, 1), at a random place
    s = rng.uniform(0.5, 1.0) * min(ih / h, iw / w)
    ch, cw = max(1, int(h * s)), max(1, int(w * s))
    top, left = rng.integers(0, ih - ch + 1), rng.integers(0, iw - cw + 1)
    crop = Image.fromarray(img[top:top + ch, left:left + cw])
    folder = os.path.join(out_dir, f'class_{i % 2}')
    os.makedirs(folder, exist_ok=True)
    crop.resize((w, h), Image.Resampling.BICUBIC).save(
        os.path.join(folder, f'{i:04d}.jpg'), 'JPEG', quality=quality)
  return count


def _digits_examples(split: str) -> Iterator[tuple[int, dict]]:
  images, labels = digits_arrays(split)
  for i, (img, lab) in enumerate(zip(images, labels)):
    yield i, {'image': tfds_io.encode_image(img, 'png'), 'label': int(lab)}


def _photos_examples() -> Iterator[tuple[int, dict]]:
  for i, name in enumerate(PHOTOS):
    yield i, {'image': tfds_io.encode_image(photo_array(name), 'png'), 'label': i}


def build_embedded(name: str, data_dir: Optional[str] = None, *, overwrite: bool = False) -> str:
  """Writes the embedded data set `name` under `data_dir`; returns its directory."""
  if name == 'digits':
    features = tfds_io.features_dict([str(i) for i in range(10)])
    gens = {'train': lambda: _digits_examples('train'), 'test': lambda: _digits_examples('test')}
    desc = 'scikit-learn digits, bicubic-upsampled to 32x32 RGB.'
  elif name == 'photos':
    features = tfds_io.features_dict(PHOTOS)
    gens = {'train': _photos_examples}
    desc = 'scikit-image sample photos at native size, RGB.'
  else:
    raise ValueError(f'unknown embedded data set {name!r}; expected one of {EMBEDDED}')
  return tfds_io.write_tfds(data_dir, name, features, gens, description=desc,
                            overwrite=overwrite, version=VERSIONS[name])


def ensure_embedded(name: str, data_dir: Optional[str] = None) -> str:
  """The directory of embedded set `name` at its current version, building it on first use
  (once across processes); an older cached version is never used."""
  root = tfds_io.resolve_data_dir(data_dir)
  path = os.path.join(root, name, VERSIONS[name])
  if os.path.exists(os.path.join(path, 'dataset_info.json')):
    return path
  with tfds_io.file_lock(os.path.join(root, f'.{name}.lock')):
    if not os.path.exists(os.path.join(path, 'dataset_info.json')):  # another process may have won
      path = build_embedded(name, data_dir)
  return path
