"""The SAM stage driver: plan chunks, run this shard's chunks, merge into one TFDS data set.

Work unit = a chunk of `chunk_size` consecutive examples of one split. Chunk j (numbered over
all splits) belongs to shard j mod num_shards, so any number of processes (one per GPU) can
share the work, and `num_shards` may even change between runs. Each finished chunk is written
to W/.sam_work/NAME/ via a temp file + rename: a kill -9 loses at most the chunk in progress,
and a re-run skips finished chunks. When every chunk exists, the process that notices (the last
shard to finish, or any re-run) writes W/NAME/1.0.0 with `tfds_io.write_tfds` (itself a temp
dir + rename), so a reader never sees a partial data set.
"""

import dataclasses
import io
import json
import os
import shutil
import sys
from typing import Optional

import ml_collections
import numpy as np
from PIL import Image

from mimjax import logs
from mimjax import workdir as workdir_lib
from mimjax.data import pipeline
from mimjax.data.builders import folder, tfds_io
from mimjax.data.builders.tfds_io import BuildError
from mimjax.sam import generator, inputs, sources

DEVICES = ('auto', 'cpu', 'cuda')
DTYPES = ('float32', 'bfloat16')  # float32: as the official generator (docs/sam.md)
AMG_KEYS = ('pred_iou_thresh', 'stability_score_thresh', 'stability_score_offset',
            'box_nms_thresh', 'crop_n_layers', 'crop_nms_thresh', 'crop_overlap_ratio',
            'crop_n_points_downscale_factor', 'min_mask_region_area')
REQUIRED = ('source', 'source_data_dir', 'name', 'mask_source', 'checkpoint', 'model_type',
            'points_per_side', 'points_per_batch', 'max_masks', 'rank_by', 'amg', 'superpixel',
            'tiny_sam', 'shard_index', 'num_shards', 'device', 'dtype', 'num_threads',
            'chunk_size', 'resize_shorter', 'skip_corrupt', 'keep_parts', 'seed')


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Examples [start, stop) of `split`; `index` numbers chunks over all splits."""
  index: int
  split: str
  start: int
  stop: int


def _int(config, key: str, lo: int, hi: Optional[int] = None) -> None:
  v = config[key]
  if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
    rng = f'{lo}..{hi}' if hi is not None else f'>= {lo}'
    raise ValueError(f'config.{key} must be an int {rng}, got {v!r}')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad or missing key."""
  missing = [k for k in REQUIRED if k not in config]
  if missing:
    raise ValueError(f'config lacks keys {missing}; start from configs/sam.py')
  if config.mask_source not in sources.MASK_SOURCES:
    raise ValueError(f'config.mask_source must be one of {sources.MASK_SOURCES}, '
                     f'got {config.mask_source!r}')
  if config.model_type not in sources.MODEL_TYPES:
    raise ValueError(f'config.model_type must be one of {sources.MODEL_TYPES}, '
                     f'got {config.model_type!r}')
  if config.rank_by not in generator.RANK_BY:
    raise ValueError(f'config.rank_by must be one of {generator.RANK_BY}, '
                     f'got {config.rank_by!r}')
  if config.mask_source == 'superpixel' and config.rank_by != 'area':
    raise ValueError("config.rank_by must be 'area' with mask_source='superpixel' "
                     f'(superpixels have no confidence scores), got {config.rank_by!r}')
  _int(config, 'points_per_side', 1)
  _int(config, 'points_per_batch', 1)
  _int(config, 'max_masks', 1, 255)
  _int(config, 'num_shards', 1)
  _int(config, 'shard_index', 0, config.num_shards - 1)
  _int(config, 'chunk_size', 1)
  _int(config, 'resize_shorter', 0)
  _int(config, 'num_threads', 0)
  if config.device.split(':')[0] not in DEVICES:
    raise ValueError(f"config.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                     f'got {config.device!r}')
  if config.dtype not in DTYPES:
    raise ValueError(f'config.dtype must be one of {DTYPES}, got {config.dtype!r}')
  unknown = sorted(set(config.amg.keys()) - set(AMG_KEYS))
  if unknown:
    raise ValueError(f'config.amg has unknown keys {unknown}; expected a subset of {AMG_KEYS} '
                     '(SamAutomaticMaskGenerator arguments)')
  if config.superpixel.method not in sources.SUPERPIXEL_METHODS:
    raise ValueError(f'config.superpixel.method must be one of {sources.SUPERPIXEL_METHODS}, '
                     f'got {config.superpixel.method!r}')


def fingerprint(config: ml_collections.ConfigDict, inp: inputs.Input) -> dict:
  """Everything that changes the output (not sharding, device, batch size or threads)."""
  fp = {k: config[k] for k in ('mask_source', 'max_masks', 'rank_by', 'chunk_size',
                               'resize_shorter', 'skip_corrupt')}
  fp['source'] = os.path.abspath(inp.path)
  fp['splits'] = {s: len(t) for s, t in inp.splits.items()}
  if config.mask_source == 'sam':
    fp.update(model_type=config.model_type, points_per_side=config.points_per_side,
              dtype=config.dtype, amg=config.amg.to_dict(),
              checkpoint=os.path.basename(config.checkpoint or ''))
    if config.model_type == 'tiny':
      fp.update(tiny_sam=config.tiny_sam.to_dict(), seed=config.seed)
  else:
    fp['superpixel'] = config.superpixel.to_dict()
  return json.loads(json.dumps(fp))  # tuples → lists, as they come back from the manifest


def plan(inp: inputs.Input, chunk_size: int) -> list:
  """All chunks, split by split (sorted names), in example order."""
  chunks = []
  for split in sorted(inp.splits):
    n = len(inp.splits[split])
    for start in range(0, n, chunk_size):
      chunks.append(Chunk(len(chunks), split, start, min(n, start + chunk_size)))
  return chunks


def _chunk_path(work: str, chunk: Chunk) -> str:
  return os.path.join(work, f'{chunk.split}-{chunk.index:06d}.npz')


def _check_manifest(work: str, fp: dict) -> None:
  """Writes the run's fingerprint, or checks a re-run against the one already there. Without
  any part file there is nothing to mix up: a re-run with another config (say, the fix an
  earlier error suggested) replaces the manifest."""
  path = os.path.join(work, 'manifest.json')
  has_parts = any(n.endswith('.npz') for n in os.listdir(work))
  if os.path.exists(path) and has_parts:
    with open(path) as f:
      old = json.load(f)
    diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
    if diff:
      raise ValueError(f'{work} holds partial results of a different run (differs in '
                       f'{diff}); use another --workdir or delete {work}')
    return
  workdir_lib.atomic_write(path, json.dumps(fp, indent=1))


def decode(data: bytes) -> np.ndarray:
  """Encoded image bytes → (H, W, 3) uint8."""
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img.convert('RGB'))


def process_chunk(inp: inputs.Input, chunk: Chunk, mask_source, config, work: str,
                  bar: Optional[logs.Progress] = None) -> dict:
  """Masks for every example of `chunk`, written to its part file; returns its stats."""
  tasks = inp.splits[chunk.split]
  labels, blobs, maps = [], [], []
  stats = {'images': 0, 'no_mask': 0, 'masks': 0, 'mask_ratio_sum': 0.0, 'skipped': []}
  for i in range(chunk.start, chunk.stop):
    name, label, data, err = folder.process_image(tasks[i], config.resize_shorter or None)
    if err is not None:
      msg = f'{name}: not a readable image ({err}); expected a JPEG/PNG/... image file'
      if not config.skip_corrupt:
        raise BuildError(f'{msg}; pass --config.skip_corrupt=True to skip such files')
      stats['skipped'].append(msg)
    else:
      image = decode(data)
      records = mask_source(image)
      seg = generator.records_to_segments(records, image.shape[:2], config.rank_by,
                                          config.max_masks)
      n_ids = len(np.unique(seg[seg > 0]))
      stats['images'] += 1
      stats['no_mask'] += int(n_ids == 0)
      stats['masks'] += n_ids
      stats['mask_ratio_sum'] += generator.mask_ratio(seg)
      labels.append(label)
      blobs.append(np.frombuffer(data, np.uint8))
      maps.append(seg)
    if bar is not None:
      bar.update(1)
  arrays = {
      'labels': np.asarray(labels, np.int64),
      'image_offsets': np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64),
      'image_bytes': np.concatenate(blobs) if blobs else np.zeros(0, np.uint8),
      'seg_shapes': np.asarray([m.shape for m in maps], np.int64).reshape(-1, 2),
      'seg_flat': (np.concatenate([m.ravel() for m in maps]) if maps
                   else np.zeros(0, np.uint8)),
      'stats': np.asarray(json.dumps(stats)),
  }
  workdir_lib.atomic_write(_chunk_path(work, chunk), lambda f: np.savez_compressed(f, **arrays))
  return stats


def read_chunk(path: str):
  """(examples [(image bytes, label, segments)], stats) of a finished part file."""
  with np.load(path, allow_pickle=False) as z:
    offs, shapes = z['image_offsets'], z['seg_shapes']
    image_bytes, seg_flat, labels = z['image_bytes'], z['seg_flat'], z['labels']
    stats = json.loads(str(z['stats']))
  examples, s = [], 0
  for k in range(len(labels)):
    h, w = (int(x) for x in shapes[k])
    seg = seg_flat[s:s + h * w].reshape(h, w)
    s += h * w
    examples.append((image_bytes[offs[k]:offs[k + 1]].tobytes(), int(labels[k]), seg))
  return examples, stats


def summarize(all_stats: dict) -> dict:
  """Per split and total: images, no-mask images, skipped files, masks/image, mask ratio."""
  out = {}
  for split, stats in sorted(all_stats.items()):
    n = sum(s['images'] for s in stats)
    out[split] = {
        'images': n,
        'no_mask_images': sum(s['no_mask'] for s in stats),
        'skipped_corrupt': sum(len(s['skipped']) for s in stats),
        'masks_per_image': sum(s['masks'] for s in stats) / max(n, 1),
        'mask_ratio': sum(s['mask_ratio_sum'] for s in stats) / max(n, 1),
    }
  return out


def finalize(inp: inputs.Input, chunks: list, config, workdir: str, name: str,
             work: str, fp: dict) -> tuple[str, dict]:
  """Writes W/NAME/VERSION from all part files (atomically); returns (path, summary)."""
  stats = {s: [] for s in inp.splits}
  skipped = []
  for c in chunks:  # stats first: an all-corrupt split is an error before anything is written
    _, st = read_chunk(_chunk_path(work, c))
    stats[c.split].append(st)
    skipped += st['skipped']
  summary = summarize(stats)
  empty = [s for s, v in summary.items() if v['images'] == 0]
  if empty:
    raise BuildError(f'split(s) {empty} have no readable images')

  def examples(split: str):
    key = 0
    for c in chunks:
      if c.split == split:
        for data, label, seg in read_chunk(_chunk_path(work, c))[0]:
          yield key, {'image': data, 'label': label, 'segments': seg}
          key += 1

  def after_write(tmp_path: str) -> None:
    with open(os.path.join(tmp_path, 'sam_stats.json'), 'w') as f:
      json.dump({'config': fp, 'summary': summary}, f, indent=1)
    if skipped:
      with open(os.path.join(tmp_path, 'skipped_files.txt'), 'w') as f:
        f.write('\n'.join(skipped) + '\n')

  features = tfds_io.features_dict(inp.classes, with_segments=True,
                                   encoding_format=inp.encoding_format)
  gens = {s: (lambda s=s: examples(s)) for s in sorted(inp.splits)}
  desc = (f'{inp.name} with {config.mask_source} segment maps (0 = no mask, 1..'
          f'{config.max_masks} by {config.rank_by}); made by python -m mimjax.sam')
  path = tfds_io.write_tfds(workdir, name, features, gens, description=desc,
                            after_write=after_write)
  return path, summary


def run(config: ml_collections.ConfigDict, workdir: str) -> Optional[str]:
  """Runs this shard; returns the data set path once complete, None while shards remain."""
  validate_config(config)
  if config.mask_source == 'sam':  # fail on weights before touching any data
    sources.check_checkpoint(config.model_type, config.checkpoint)
  inp = inputs.open_input(config.source, config.source_data_dir)
  name = config.name or inp.name
  workdir = os.path.abspath(os.path.expanduser(workdir))
  workdir_lib.check_output_dir(workdir)
  final = os.path.join(workdir, name, tfds_io.VERSION)
  if os.path.abspath(inp.path) == final:
    raise ValueError(f'output {final} would overwrite the source; use another --workdir')
  if os.path.exists(os.path.join(final, 'dataset_info.json')):
    print(f'mimjax.sam: {final} is complete; nothing to do', file=sys.stderr)
    return final
  work = os.path.join(workdir, '.sam_work', name)
  os.makedirs(work, exist_ok=True)
  workdir_lib.remove_stale_temp(work)  # part files a killed process was writing
  fp = fingerprint(config, inp)
  _check_manifest(work, fp)
  chunks = plan(inp, config.chunk_size)
  todo = [c for c in chunks if c.index % config.num_shards == config.shard_index
          and not os.path.exists(_chunk_path(work, c))]
  if todo:
    mask_source = sources.make_mask_source(config)
    total = sum(c.stop - c.start for c in todo)
    label = f'shard {config.shard_index}/{config.num_shards}: images'
    with logs.Progress(total, prog='mimjax.sam', label=label) as bar:
      for c in todo:
        process_chunk(inp, c, mask_source, config, work, bar)
  waiting = sorted({c.index % config.num_shards for c in chunks
                    if not os.path.exists(_chunk_path(work, c))})
  if waiting:
    print(f'mimjax.sam: shard {config.shard_index} done; waiting for shards {waiting} '
          '(the last one to finish, or any re-run, writes the data set)', file=sys.stderr)
    return None
  with tfds_io.file_lock(os.path.join(workdir, '.sam_work', f'{name}.lock')):
    if os.path.exists(os.path.join(final, 'dataset_info.json')):
      return final  # another shard finalised while we waited for the lock
    workdir_lib.remove_stale_temp(workdir, prefix=f'.{name}.')  # a killed finalise's temp dir
    path, summary = finalize(inp, chunks, config, workdir, name, work, fp)
  if not config.keep_parts:
    shutil.rmtree(work, ignore_errors=True)
  _report(path, name, workdir, summary)
  return path


def _report(path: str, name: str, workdir: str, summary: dict) -> None:
  for split, s in summary.items():
    print(f'mimjax.sam: {split}: {s["images"]} images, {s["no_mask_images"]} without any mask '
          f'(all-zero map), {s["skipped_corrupt"]} corrupt skipped, '
          f'{s["masks_per_image"]:.2f} masks/image, mask ratio {s["mask_ratio"]:.3f}',
          file=sys.stderr)
  print(f'mimjax.sam: wrote {path}\n  train on it with: --config.data.name={name} '
        f'--config.data.data_dir={workdir}', file=sys.stderr)
  images = sum(s['images'] for s in summary.values())
  none = sum(s['no_mask_images'] for s in summary.values())
  if 2 * none > images:
    print(f'mimjax.sam: WARNING: {none} of {images} images ({none / images:.0%}) got no mask: '
          'MRE/KD training on them is plain MAE (it refuses a set above '
          f'{pipeline.default_data_config().max_maskless_fraction:.0%}). Usual cause: a wrong '
          '--config.checkpoint or --config.model_type, or thresholds too strict '
          '(--config.amg.pred_iou_thresh, --config.amg.stability_score_thresh); see docs/sam.md',
          file=sys.stderr)
