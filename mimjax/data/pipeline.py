"""grain input pipeline: TFDS records → augmented host-local numpy batches.

Batch plan (why it is device- and host-count independent): the global example stream of
epoch e is a permutation of all N records drawn from (seed, e); global batch s is the s-th run
of `global_batch_size` consecutive examples of that stream (the last N mod G records of every
epoch are dropped), and host p of P takes slice [p·B, (p+1)·B) of it, B = G / P. Each example's
augmentation RNG is seeded with (seed, position in the global stream), so resuming at batch s
reproduces exactly what an uninterrupted run would have produced. The loader state is just the
next batch index. Batches are built by a picklable map over batch indices, so grain threads or
worker processes (`worker_count`) build whole batches in parallel and in order.
"""

import functools
import io
import math
import os
import sys
import time
from typing import Any, Optional

import ml_collections
import numpy as np

from mimjax.data import augment as aug_lib
from mimjax.data.builders import embedded, tfds_io

NAMES = ('digits', 'photos', 'image_folder', 'imagenet2012', 'imagenet100', 'synthetic')
AUGMENTS = ('mae', 'simple', 'lut', 'dino', 'eval', 'none', 'finetune')
EVAL_SPLITS = ('validation', 'test', 'val')
AUGMENT_ON = ('device', 'host')
# Recipes whose photometric ops the train step runs with augment_on='device'
# (mimjax.data.device_augment.RECIPES); the others have none, or RandAugment ('finetune'),
# whose colour ops interleave with geometric ones and stay on the host.
DEVICE_PHOTOMETRIC = ('dino', 'lut')
# Recipes whose RandomResizedCrop views the device can cut (crop_on='device'): the host ships
# a fixed-size canvas plus each view's box and flip (mimjax.data.device_augment.crop_views).
DEVICE_CROPS = ('mae', 'dino')
_SHUFFLE_SALT = 0x5EED
_AUG_SALT = 0xA06


def default_data_config() -> ml_collections.ConfigDict:
  """Every data key with its default (configs start from this and override)."""
  return ml_collections.ConfigDict({
      'name': 'digits',            # one of NAMES
      'data_dir': '',              # '' → $MIMJAX_DATA_DIR or ~/.cache/mimjax/tfds
      'image_size': 32,            # output side (global crops for 'dino')
      'augment': 'mae',            # one of AUGMENTS (train=True); eval always uses 'eval'
      # 'device': the photometric part of 'dino' / 'lut' (colour jitter, grayscale, blur,
      # solarize) runs in the train step (mimjax.data.device_augment); the host only crops and
      # flips. 'host': all of it here, with PIL (docs/data.md).
      'augment_on': 'device',
      # 'device' ('mae', 'dino'): the host ships the decoded image on a fixed `canvas_size`
      # canvas and each view's RandomResizedCrop box + flip (drawn as the host path draws them);
      # the train step cuts the views (bicubic, antialiased), their segment maps (nearest) and
      # the maps' patch ids. 'host': PIL crops, patch ids here (docs/data.md).
      'crop_on': 'host',
      'canvas_size': (384, 384),
      'worker_count': 0,           # grain worker processes; 0 = in-process (threads)
      'prefetch': 2,               # batches buffered ahead (per worker)
      'read_threads': 2,           # threads building batches in each process
      'use_segments': True,        # yield `segments` when the records have them
      # > 0: replace every segment map by its patch ids (majority id per p×p patch, computed
      # here on the host, or by the train step with crop_on='device') so the model gets (…, N)
      # ids, not (…, H, W) maps; MRE configs set it to the model's patch size
      # (configs/common.py: ship_segment_ids).
      'segment_patch_size': 0,
      'segment_num_ids': 256,      # ids ≥ this do not vote (model.segment_bias.num_ids)
      # A training loader that ships patch ids (MRE, KD) refuses a SAM output whose
      # sam_stats.json says more of its images than this got no mask (1 = never refuse).
      'max_maskless_fraction': 0.9,
      'crop_scale': (0.2, 1.0),    # RandomResizedCrop area range ('mae')
      'crop_ratio': (3 / 4, 4 / 3),
      'crop_padding': 4,           # reflect padding of the simple random crop ('simple', 'lut')
      'eval_crop_pct': 0.875,      # eval: resize shorter side to image_size / crop_pct
      'global_crops_scale': (0.4, 1.0),   # DINO
      'local_crops_scale': (0.05, 0.4),
      'local_crops_number': 8,
      'local_size': 96,
      'synthetic_size': 10000,     # records in the 'synthetic' train split (test: 1/10)
      'num_classes': 1000,         # labels of 'synthetic'
      'randaug_num_ops': 2,        # 'finetune': RandAugment layers per image (timm n)
      'randaug_magnitude': 9.0,    # 'finetune': mean magnitude M in [0, 10] (timm m)
      'randaug_mstd': 0.5,         # 'finetune': magnitude std (timm mstd; > 100 → U(0, M))
  })


def _pair(cfg, key: str, lo: float = 0.0, hi: float = math.inf) -> None:
  v = cfg.get(key)
  try:
    a, b = (float(x) for x in v)
  except (TypeError, ValueError):
    raise ValueError(f'data.{key} must be a pair (min, max), got {v!r}') from None
  if not lo <= a <= b <= hi:
    raise ValueError(f'data.{key} must satisfy {lo} <= min <= max <= {hi}, got {v!r}')


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad/missing key of a data config."""
  missing = sorted(set(default_data_config()) - set(cfg.keys()))
  if missing:
    raise ValueError(f'data config lacks keys {missing}; start from '
                     'mimjax.data.pipeline.default_data_config()')
  if cfg.name not in NAMES:
    raise ValueError(f'data.name must be one of {NAMES}, got {cfg.name!r}')
  if cfg.augment not in AUGMENTS:
    raise ValueError(f'data.augment must be one of {AUGMENTS}, got {cfg.augment!r}')
  if cfg.augment_on not in AUGMENT_ON:
    raise ValueError(f'data.augment_on must be one of {AUGMENT_ON}, got {cfg.augment_on!r}')
  if cfg.crop_on not in AUGMENT_ON:
    raise ValueError(f'data.crop_on must be one of {AUGMENT_ON}, got {cfg.crop_on!r}')
  if cfg.crop_on == 'device' and cfg.augment not in DEVICE_CROPS:
    raise ValueError(f'data.crop_on=device cuts the views of {DEVICE_CROPS}, not '
                     f'data.augment={cfg.augment!r}; use crop_on=host')
  canvas = cfg.canvas_size
  if (not isinstance(canvas, (tuple, list)) or len(canvas) != 2
      or not all(isinstance(x, int) and x > 0 for x in canvas)):
    raise ValueError(f'data.canvas_size must be two positive ints (h, w), got {canvas!r}')
  for key in ('image_size', 'local_size', 'synthetic_size', 'num_classes'):
    if not isinstance(cfg[key], int) or cfg[key] <= 0:
      raise ValueError(f'data.{key} must be a positive int, got {cfg[key]!r}')
  for key in ('worker_count', 'prefetch', 'read_threads', 'local_crops_number',
              'crop_padding', 'segment_patch_size', 'segment_num_ids'):
    if not isinstance(cfg[key], int) or cfg[key] < 0:
      raise ValueError(f'data.{key} must be a non-negative int, got {cfg[key]!r}')
  if not isinstance(cfg.randaug_num_ops, int) or cfg.randaug_num_ops < 0:
    raise ValueError('data.randaug_num_ops must be a non-negative int, got '
                     f'{cfg.randaug_num_ops!r}')
  if (not isinstance(cfg.randaug_magnitude, (int, float))
      or not 0 <= cfg.randaug_magnitude <= 10):
    raise ValueError('data.randaug_magnitude must be a number in [0, 10], got '
                     f'{cfg.randaug_magnitude!r}')
  if not isinstance(cfg.randaug_mstd, (int, float)) or not cfg.randaug_mstd >= 0:
    raise ValueError(f'data.randaug_mstd must be a number >= 0, got {cfg.randaug_mstd!r}')
  for key in ('crop_scale', 'global_crops_scale', 'local_crops_scale'):
    _pair(cfg, key, 0.0, 1.0)
  _pair(cfg, 'crop_ratio', 0.0)
  if not 0 < cfg.eval_crop_pct <= 1:
    raise ValueError(f'data.eval_crop_pct must be in (0, 1], got {cfg.eval_crop_pct!r}')
  if not 0 <= cfg.max_maskless_fraction <= 1:
    raise ValueError('data.max_maskless_fraction must be in [0, 1], got '
                     f'{cfg.max_maskless_fraction!r}')
  if cfg.data_dir is not None and not isinstance(cfg.data_dir, str):
    raise ValueError(f'data.data_dir must be a str or None, got {cfg.data_dir!r}')


# ------------------------------------------------------------------------------------- sources
class SyntheticSource:
  """Deterministic random uint8 images/labels generated on the fly (benchmarks, no data)."""

  def __init__(self, size: int, image_size: int, num_classes: int, salt: int = 0):
    self._size, self._image_size, self._classes, self._salt = (
        size, image_size, num_classes, salt)

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng([self._salt, int(index)])
    s = self._image_size
    return {'image': rng.integers(0, 256, (s, s, 3), dtype=np.uint8),
            'label': int(rng.integers(0, self._classes))}


def _resolve_split(available, split: str, where: str) -> str:
  """`split`, or an eval alias ('validation'/'test'/'val') that the data set has."""
  if split in available:
    return split
  if split in EVAL_SPLITS:
    for alt in EVAL_SPLITS:
      if alt in available:
        return alt
  raise ValueError(f'{where} has no split {split!r}; it has {sorted(available)}')


def _dataset_dir(cfg) -> str:
  """Prepared TFDS directory of cfg.name (embedded sets are built on first use)."""
  if cfg.name in embedded.EMBEDDED:
    if not cfg.data_dir:  # the default cache: always the current embedded version
      return embedded.ensure_embedded(cfg.name)
    path = tfds_io.find_dataset_dir(cfg.data_dir, cfg.name)  # e.g. SAM output of `photos`
    return path or embedded.ensure_embedded(cfg.name, cfg.data_dir)
  path = tfds_io.find_dataset_dir(cfg.data_dir, cfg.name)
  if path is None:
    root = tfds_io.resolve_data_dir(cfg.data_dir)
    raise FileNotFoundError(
        f'no prepared data set {cfg.name!r} under {root} (expected {root}/{cfg.name}/'
        f'{tfds_io.VERSION}/dataset_info.json); build it with `python -m mimjax.data.build '
        f'{cfg.name} --source DIR --data_dir {root}`')
  return path


def open_source(cfg, split: str, encoded_images: bool = False) -> tuple[Any, bool]:
  """(random-access source of decoded records, whether records carry `segments`);
  `encoded_images`: their `image` stays the stored bytes (for `decode_image`)."""
  if cfg.name == 'synthetic':
    n = cfg.synthetic_size if split == 'train' else max(1, cfg.synthetic_size // 10)
    return SyntheticSource(n, cfg.image_size, cfg.num_classes, 0 if split == 'train' else 1), False
  path = _dataset_dir(cfg)
  builder = tfds_io.load_builder(path)
  split = _resolve_split(builder.info.splits.keys(), split, path)
  has_segments = 'segments' in builder.info.features
  decoders = None
  if encoded_images:
    import tensorflow_datasets as tfds
    decoders = {'image': tfds.decode.SkipDecoding()}
  return builder.as_data_source(split=split, decoders=decoders), has_segments


def decode_image(data: bytes, fit_hw: Optional[tuple] = None) -> np.ndarray:
  """Stored image bytes → (H, W, 3) uint8 ((H, W) if grayscale), PIL as TFDS decodes them.

  `fit_hw`: already shrunk (bicubic) to the size it takes on an (h, w) canvas
  (augment.fit_size), as augment.to_canvas would. A JPEG at least 4× that size is first decoded
  DCT-scaled (PIL `draft`: by 1/2, 1/4 or 1/8) to no less than twice it — PIL's
  `reducing_gap=2`, as `Image.thumbnail` — which skips most of the decode. Against the full
  decode + the same shrink: mean ≤ 1.5 levels, 99 % within 8 (tests/data/test_pipeline.py,
  docs/data.md); exact when no draft applies. An RGB JPEG that needs no shrink is decoded by
  simplejpeg (the same libjpeg-turbo decode, bit-identical to PIL's, tested; 23 % less CPU:
  no PIL image, no copy out of it)."""
  import simplejpeg
  from PIL import Image
  if simplejpeg.is_jpeg(data):
    h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    if colorspace in ('YCbCr', 'RGB') and (fit_hw is None
                                           or aug_lib.fit_size(h, w, fit_hw) == (h, w)):
      return simplejpeg.decode_jpeg(data, colorspace='RGB')
  with Image.open(io.BytesIO(data)) as im:
    fit = None if fit_hw is None else aug_lib.fit_size(im.height, im.width, fit_hw)
    if fit is not None and fit != (im.height, im.width):
      im.draft('RGB', (2 * fit[1], 2 * fit[0]))
    if im.mode not in ('RGB', 'L'):
      im = im.convert('RGB')
    if fit is not None and fit != im.size[::-1]:
      im = im.resize((fit[1], fit[0]), aug_lib.BICUBIC)
    return np.asarray(im)


def check_mask_coverage(cfg, split: str) -> None:
  """One error line when the run needs segment maps (it ships patch ids: MRE, KD) and the
  data set's sam_stats.json (written by `python -m mimjax.sam`) says more than
  `data.max_maskless_fraction` of `split` got no mask: training would silently be plain MAE."""
  if cfg.name == 'synthetic' or not (cfg.use_segments and cfg.segment_patch_size > 0):
    return
  path = os.path.join(_dataset_dir(cfg), 'sam_stats.json')
  if not os.path.exists(path):
    return
  import json
  try:
    summary = json.loads(open(path, 'rb').read())['summary']
    stats = summary.get(split) or next(iter(summary.values()))
    images, none = int(stats['images']), int(stats['no_mask_images'])
  except (ValueError, KeyError, TypeError, StopIteration, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is damaged ({type(e).__name__}); re-run the SAM stage that wrote '
                     'it (python -m mimjax.sam, docs/sam.md)') from None
  if images and none / images > cfg.max_maskless_fraction:
    raise ValueError(
        f'{path}: {none} of {images} {split} images ({none / images:.0%}) got no SAM mask, so '
        'this run would train on empty segment maps (plain MAE); re-make the masks with the '
        'right checkpoint or looser thresholds (docs/sam.md), or pass '
        '--config.data.max_maskless_fraction=1 to train anyway')


def num_examples(data_config: ml_collections.ConfigDict, split: str) -> int:
  """Number of records in `split` of the configured data set."""
  if data_config.name == 'synthetic':
    return len(open_source(data_config, split)[0])
  path = _dataset_dir(data_config)
  sizes = tfds_io.split_sizes(path)
  return sizes[_resolve_split(sizes, split, path)]


# ------------------------------------------------------------------------------- batch building
def crops_on_device(cfg) -> bool:
  """Whether the train step, not the host, cuts this config's RandomResizedCrop views."""
  return cfg.get('crop_on', 'host') == 'device' and cfg.augment in DEVICE_CROPS


def device_crop_example(cfg, rng: np.random.Generator, image: np.ndarray,
                        segments: Optional[np.ndarray], augment: str) -> dict:
  """crop_on='device': the image as it lies on the canvas (+ its segment map) and every view
  group's boxes/flips (host draws only; the device cuts maps and patch ids too). `collate`
  pads them onto the batch's canvases (`canvas`, `canvas_segments`)."""
  image = aug_lib.fit_to_canvas(image, cfg.canvas_size)
  h, w = image.shape[:2]
  out = {'canvas': image}
  if segments is not None:
    out['canvas_segments'] = aug_lib.fit_to_canvas(segments, cfg.canvas_size, aug_lib.NEAREST)
  if augment == 'mae':
    groups = [('image', 1, cfg.crop_scale)]
  else:
    groups = [('global', 2, cfg.global_crops_scale),
              ('local', cfg.local_crops_number, cfg.local_crops_scale)]
  for key, n, scale in groups:
    out[f'boxes_{key}'], out[f'flips_{key}'] = aug_lib.crop_plan(rng, h, w, n, tuple(scale))
  return out


def canvas_reach(cfg) -> int:
  """Pixels past the image's right and bottom edges that the device's crops can read from its
  canvas (`collate` edge-replicates that many, zeros the rest): the bicubic kernel's radius,
  2 output pixels, in canvas pixels for the most-shrunk view (a box of up to the canvas's
  longer side cut to the smallest view)."""
  views = [cfg.image_size] + ([cfg.local_size] if cfg.augment == 'dino' else [])
  return math.ceil(2 * max(cfg.canvas_size) / min(views))


def photometric_on_device(cfg) -> bool:
  """Whether the train step, not the host, applies this config's photometric augmentations."""
  return cfg.get('augment_on', 'device') == 'device' and cfg.augment in DEVICE_PHOTOMETRIC


def augment_example(cfg, rng: Optional[np.random.Generator], image: np.ndarray,
                    segments: Optional[np.ndarray], augment: str) -> dict:
  """One decoded record → the output fields of `augment` (unbatched)."""
  size = cfg.image_size
  host_photometric = not photometric_on_device(cfg)
  if augment != 'eval' and crops_on_device(cfg):
    return device_crop_example(cfg, rng, image, segments, augment)
  if augment == 'mae':
    image, segments = aug_lib.mae_view(rng, image, segments, size, tuple(cfg.crop_scale))
  elif augment == 'simple':
    image, segments = aug_lib.simple_resized_crop(rng, image, segments, size, cfg.crop_padding)
  elif augment == 'lut':
    image, segments = aug_lib.lut_views(rng, image, segments, size, host_photometric)
  elif augment == 'dino':
    return aug_lib.dino_views(rng, image, segments, size, cfg.local_size,
                              cfg.local_crops_number, tuple(cfg.global_crops_scale),
                              tuple(cfg.local_crops_scale), host_photometric)
  elif augment == 'finetune':
    image, segments = aug_lib.finetune_view(
        rng, image, segments, size, tuple(cfg.crop_scale), tuple(cfg.crop_ratio),
        cfg.randaug_num_ops, float(cfg.randaug_magnitude), float(cfg.randaug_mstd))
  elif augment == 'eval':
    image, segments = aug_lib.eval_view(image, segments, size, cfg.eval_crop_pct)
  else:  # 'none'
    image, segments = aug_lib.resize_view(image, segments, size)
  out = {'image': np.ascontiguousarray(image)}
  if segments is not None:
    out['segments'] = np.ascontiguousarray(segments)
  return out


def segment_ids_key(segments_key: str) -> str:
  """'segments' → 'segment_ids', 'segments_global' → 'segment_ids_global', ..."""
  return 'segment_ids' + segments_key[len('segments'):]


def to_patch_ids(batch: dict, cfg) -> dict:
  """Every `segments*` map (..., H, W) → `segment_ids*` (..., N) uint8 patch ids when
  cfg.segment_patch_size > 0 (the maps are dropped: the device only needs the ids)."""
  p = cfg.get('segment_patch_size', 0)
  if not p:
    return batch
  out = {}
  for key, value in batch.items():
    if key.startswith('segments'):
      ids = aug_lib.patch_segment_ids(value, p, cfg.get('segment_num_ids', 256))
      out[segment_ids_key(key)] = ids.reshape(ids.shape[:-2] + (-1,))
    else:
      out[key] = value
  return out


def collate(outs: list, cfg) -> dict:
  """Augmented examples → one batch: int32 labels, uint8 images/maps, maps → patch ids;
  crop_on='device': each image (map) onto its row of the batch's canvas, edge-replicated as far
  as the device's crops read (`canvas_reach`), zeros beyond."""
  batch = {}
  for k in outs[0]:
    if k.startswith('canvas'):  # in place: a per-image canvas + np.stack costs 2× the pages
      batch[k] = np.empty((len(outs), *cfg.canvas_size, *outs[0][k].shape[2:]), np.uint8)
      pad = canvas_reach(cfg) if k == 'canvas' else 0  # maps are cut nearest, inside boxes
      for o, row in zip(outs, batch[k]):
        aug_lib.to_canvas(o[k], cfg.canvas_size, out=row, pad=pad)
    else:
      batch[k] = np.stack([o[k] for o in outs])
  batch['label'] = batch['label'].astype(np.int32)
  for k, v in batch.items():
    if k != 'label' and not k.startswith(('boxes_', 'flips_')):  # crop plans keep their types
      batch[k] = v.astype(np.uint8, copy=False)
  return to_patch_ids(batch, cfg)


def blank_example(data_config: ml_collections.ConfigDict, *, segments: bool,
                  train: bool = True) -> dict:
  """A batch of one built from a blank image (and blank segment map when `segments`): the
  keys, shapes and dtypes the loader yields, without opening any data set (for planning)."""
  s = data_config.image_size
  seg = np.zeros((s, s), np.uint8) if segments else None
  out = augment_example(data_config, np.random.default_rng(0), np.zeros((s, s, 3), np.uint8),
                        seg, data_config.augment if train else 'eval')
  batch = collate([dict(out, label=np.int32(0))], data_config)
  if not train:
    batch['mask'] = np.ones(1, bool)
  return batch


class DataReadError(ValueError):
  """A record of the data set could not be read (a damaged file); one line naming it."""


def _first_line(e: Exception) -> str:
  """What a reader's exception says, in one short line (its errors span many lines)."""
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _split_files(cfg, split: str) -> str:
  """The record file(s) of a split, for error messages."""
  if cfg.name == 'synthetic':
    return ''
  import glob
  path = _dataset_dir(cfg)
  files = sorted(glob.glob(os.path.join(path, f'*-{split}.*')))
  if len(files) == 1:
    return files[0]
  return f'{path} (split {split!r}, {len(files)} files)'


class _BatchMaker:
  """Host batch index → batch dict. Picklable so grain worker processes can run it."""

  def __init__(self, cfg, source, has_segments: bool, *, global_batch_size: int,
               process_index: int, process_count: int, seed: int, train: bool,
               files: str = ''):
    self.cfg = ml_collections.ConfigDict(cfg.to_dict())  # a plain copy travels to workers
    self.files = files  # what a read error names
    self.source = source
    self.segments = has_segments and cfg.use_segments
    self.global_batch = global_batch_size
    self.process_count = process_count
    self.batch = global_batch_size // process_count
    self.offset = process_index * self.batch
    self.seed = seed
    self.train = train
    self.augment = cfg.augment if train else 'eval'
    self.n = len(source)
    self._perm_epoch, self._perm = -1, None
    # crop_on='device' decodes the stored bytes itself: DCT-scaled when the canvas is smaller
    self.fit_hw = (tuple(cfg.canvas_size) if train and crops_on_device(cfg)
                   and cfg.name != 'synthetic' else None)

  @property
  def steps_per_epoch(self) -> int:
    return self.n // self.global_batch

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch, _SHUFFLE_SALT]).permutation(self.n)
      self._perm_epoch = epoch
    return self._perm

  def plan(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(record indices, global stream positions, real-example mask) of host batch `step`."""
    j = np.arange(self.batch)
    if self.train:
      epoch, within = divmod(step, self.steps_per_epoch)
      pos_in_epoch = within * self.global_batch + self.offset + j
      records = self._permutation(epoch)[pos_in_epoch]
      return records, step * self.global_batch + self.offset + j, np.ones(self.batch, bool)
    pos = step * self.global_batch + self.offset + j
    mask = pos < self.n
    return np.where(mask, pos, 0), pos, mask

  def _read(self, records: np.ndarray) -> list:
    keys = [int(r) for r in records]
    try:
      # One at a time: array_record's batched __getitems__ reads in a thread pool, which costs
      # 45 % more CPU per record (measured: 0.176 vs 0.120 ms); read_threads and grain workers
      # already overlap the reads.
      return [self.source[k] for k in keys]
    except Exception as e:  # pylint: disable=broad-except  (array_record/Riegeli errors vary)
      why = _first_line(e)
      raise DataReadError(f'{self.files or "the data set"}: cannot read records {keys[:3]}'
                          f'{"..." if len(keys) > 3 else ""} ({why}); the file is damaged: '
                          'rebuild the data set (python -m mimjax.data.build, or the SAM '
                          'stage that wrote it) or restore it from a copy') from None

  def _decode(self, data: bytes, record) -> np.ndarray:
    try:
      return decode_image(data, self.fit_hw)
    except Exception as e:  # pylint: disable=broad-except  (PIL's errors vary by format)
      why = _first_line(e)
      raise DataReadError(f'{self.files or "the data set"}: cannot decode the image of record '
                          f'{int(record)} ({why}); the file is damaged: rebuild the data set '
                          '(python -m mimjax.data.build) or restore it from a copy') from None

  def __call__(self, step: int) -> dict:
    records, positions, mask = self.plan(int(step))
    examples = self._read(records)
    outs = []
    for ex, pos, record in zip(examples, positions, records):
      rng = (np.random.default_rng([self.seed, int(pos), _AUG_SALT]) if self.train else None)
      image = ex['image']
      if self.fit_hw is not None:
        image = self._decode(image, record)
      image = np.asarray(image)
      if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
      segs = np.asarray(ex['segments']) if self.segments else None
      out = augment_example(self.cfg, rng, image, segs, self.augment)
      out['label'] = np.int32(ex['label'])
      outs.append(out)
    batch = collate(outs, self.cfg)
    if not self.train:
      batch['mask'] = mask
    return batch


def exit_with_parent(worker_index: int, worker_count: int, *, parent: int) -> None:
  """grain worker init: exit when the trainer (pid `parent`) is gone. A parent killed with -9
  cannot stop its workers, which would otherwise live on, holding memory and the data files.
  `parent` comes from the trainer: a worker that starts after its parent died sees pid 1."""
  del worker_index, worker_count
  import threading

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)  # pylint: disable=protected-access  (no cleanup left to do: the run is gone)

  threading.Thread(target=watch, daemon=True, name='mimjax-exit-with-parent').start()


class Loader:
  """Iterator over host-local numpy batches with JSON-able get_state()/set_state()."""

  def __init__(self, maker: _BatchMaker, *, worker_count: int, prefetch: int,
               read_threads: int, meta: dict):
    self._maker = maker
    self._workers = worker_count
    self._prefetch = prefetch
    self._threads = read_threads
    self._meta = meta
    self.num_batches = (None if maker.train
                        else math.ceil(maker.n / maker.global_batch))  # eval: one pass
    self._step = 0
    self._it = None

  def _start(self) -> None:
    # grain is imported here, not at module level: it costs ~0.8 s, and configs, config
    # errors, conversion and the SAM stage import this module without reading any data.
    import grain
    stop = sys.maxsize if self.num_batches is None else self.num_batches
    ds = grain.MapDataset.range(self._step, max(self._step, stop)).map(self._maker)
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, self._threads),
                                               prefetch_buffer_size=max(1, self._prefetch)))
    if self._workers > 0:
      from absl import flags  # grain's workers read absl flags; outside an absl app, use defaults
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ids = ids.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._workers, per_worker_buffer_size=max(1, self._prefetch)),
          worker_init_fn=functools.partial(exit_with_parent, parent=os.getpid()))
    self._it = iter(ids)

  def __iter__(self) -> 'Loader':
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._start()
    batch = next(self._it)
    self._step += 1
    return batch

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError('a training loader repeats forever and has no length')
    return self.num_batches

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per epoch (drop remainder)."""
    return self._maker.steps_per_epoch

  def get_state(self) -> dict:
    """JSON-serialisable position: the next batch index plus what it is valid for."""
    return dict(self._meta, step=self._step)

  def set_state(self, state: dict) -> None:
    """Resume so the next batch is exactly the one an uninterrupted loader would yield."""
    for key, value in self._meta.items():
      if key in state and state[key] != value:
        raise ValueError(f'loader state was saved with {key}={state[key]!r} but this loader '
                         f'has {key}={value!r}; the batch sequence would differ')
    self._step = int(state['step'])
    self._it = None  # rebuilt lazily from the new position (drops any prefetched batches)


def batch_maker(data_config: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                split: str = 'train', train: bool = True) -> _BatchMaker:
  """The host batch function of a loader (batch index → host batch), without the loader."""
  import jax  # only for the process topology
  validate_data_config(data_config)
  pc, pi = jax.process_count(), jax.process_index()
  if global_batch_size <= 0 or global_batch_size % pc:
    raise ValueError(f'global_batch_size {global_batch_size} must be a positive multiple of '
                     f'the process count {pc}')
  source, has_segments = open_source(data_config, split,
                                     encoded_images=train and crops_on_device(data_config))
  if train and has_segments:
    check_mask_coverage(data_config, split)
  if train and len(source) < global_batch_size:
    # Name what was read: data_dir may point at another set than data.name (a SAM output).
    path = '' if data_config.name == 'synthetic' else _dataset_dir(data_config)
    read = f'{os.path.basename(os.path.dirname(path))!r} ({path})' if path else "'synthetic'"
    raise ValueError(f'data set {read} split {split!r} has {len(source)} examples, fewer than '
                     f'one global batch of {global_batch_size}; lower --config.batch_size')
  return _BatchMaker(data_config, source, has_segments, global_batch_size=global_batch_size,
                     process_index=pi, process_count=pc, seed=seed, train=train,
                     files=_split_files(data_config, split))


def make_loader(data_config: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                split: str = 'train', train: bool = True) -> Loader:
  """The host-local loader: global_batch_size // process_count examples per batch."""
  maker = batch_maker(data_config, global_batch_size=global_batch_size, seed=seed, split=split,
                      train=train)
  meta = {'name': data_config.name, 'split': split, 'seed': int(seed), 'train': bool(train),
          'global_batch_size': int(global_batch_size), 'process_count': maker.process_count}
  # No process_index: the batch plan is global (step → every host's slice), so one saved
  # state (process 0's, in the checkpoint) resumes every host.
  return Loader(maker, worker_count=data_config.worker_count, prefetch=data_config.prefetch,
                read_threads=data_config.read_threads, meta=meta)


def encoded_images(data_config: ml_collections.ConfigDict, records, split: str = 'train') -> list:
  """The stored (encoded JPEG/PNG) bytes of `records`, undecoded (for reference pipelines)."""
  if data_config.name == 'synthetic':
    raise ValueError("data.name='synthetic' has no encoded images; use a prepared data set "
                     '(e.g. image_folder, docs/performance.md)')
  import tensorflow_datasets as tfds
  path = _dataset_dir(data_config)
  builder = tfds_io.load_builder(path)
  split = _resolve_split(builder.info.splits.keys(), split, path)
  source = builder.as_data_source(split=split,
                                  decoders={'image': tfds.decode.SkipDecoding()})
  return [source[int(r)]['image'] for r in records]


def host_cpu_seconds(maker: _BatchMaker, steps) -> float:
  """CPU time (process time: robust on a loaded machine) this process spends building the
  host batches `steps` in line: read, decode, augment, collate (worker_count=0, one thread)."""
  t = time.process_time()
  for step in steps:
    maker(step)
  return time.process_time() - t


def benchmark_loader(data_config: ml_collections.ConfigDict, global_batch_size: int,
                     num_batches: int, warmup: int = 2, seed: int = 0) -> dict:
  """Host input-pipeline throughput: img/s over `num_batches` after `warmup` batches."""
  t0 = time.perf_counter()
  loader = make_loader(data_config, global_batch_size=global_batch_size, seed=seed)
  first = next(loader)
  first_s = time.perf_counter() - t0
  for _ in range(max(0, warmup - 1)):
    next(loader)
  t = time.perf_counter()
  for _ in range(num_batches):
    batch = next(loader)
  dt = time.perf_counter() - t
  host_batch = len(first['label'])
  return {'img_per_s': host_batch * num_batches / dt, 'batch_s': dt / num_batches,
          'first_batch_s': first_s, 'host_batch_size': host_batch, 'num_batches': num_batches,
          'name': data_config.name, 'augment': data_config.augment,
          'image_size': data_config.image_size, 'worker_count': data_config.worker_count,
          'shapes': {k: list(v.shape) for k, v in batch.items()}}
