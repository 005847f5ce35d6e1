"""Throughput benchmark: train-step img/s, step time, FLOPs/img, MFU, memory; loader img/s.

  python -m mimjax.bench --config configs/mae.py:tiny
  python -m mimjax.bench --config configs/mae.py:vit_b --config.batch_size=256 \
      --config.model.dtype=bfloat16 --config.model.attention=fused --steps 20
  python -m mimjax.bench --config configs/mae.py:tiny --data   # input pipeline only
  python -m mimjax.bench --config configs/mae.py:tiny --torch eager   # + PyTorch MAE, ratio
  python -m mimjax.bench --suite --rows mae --tiny --out suite.json   # mimjax/bench_suite.py

The step runs on synthetic device-resident data (no data set needed), so it measures the
model step alone; `--data` measures the host input pipeline alone. `--torch eager|compile`
also times the official-recipe PyTorch MAE step (mimjax/bench_torch.py) on the same device,
sizes and batch and reports `jax_over_torch` = JAX img/s ÷ PyTorch img/s. Details and
measured numbers: docs/performance.md.
"""

import json
import os
import resource
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from mimjax import bench_suite

def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so importing this module next to
  mimjax.main, e.g. in tests, defines no second --config)."""
  config_flags.DEFINE_config_file('config', None, 'configs/X.py:ARG', lock_config=True)
  flags.DEFINE_integer('steps', 10, 'Timed steps.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_bool('data', False, 'Benchmark the input pipeline instead of the step.')
  flags.DEFINE_float('peak_tflops', None, 'Peak TFLOP/s per device for MFU '
                     '(default: a table of known accelerators, see PEAK_TFLOPS).')
  flags.DEFINE_string('json', None, 'Also write the result as JSON to this path.')
  flags.DEFINE_enum('torch', None, ['eager', 'compile', 'none'],
                    'Also time the PyTorch MAE reference (MAE configs only); with --data, the '
                    'official torchvision host pipeline (MAE, DINO) on the same images. '
                    '--suite: default eager; none turns it off.')
  flags.DEFINE_integer('torch_threads', None, 'torch CPU threads for --torch (default: torch\'s).')
  flags.DEFINE_string('make_jpegs', None, 'Write 300 JPEGs at ImageNet sizes cut from the '
                      'scikit-image photos into this folder (class subfolders) and exit.')
  flags.DEFINE_integer('rounds', 3, '--data: interleaved CPU-time rounds (medians reported).')
  flags.DEFINE_alias('out', 'json')
  flags.DEFINE_bool('suite', False, 'The hardware-day suite (mimjax/bench_suite.py): attention '
                    'kernels vs the einsum path, then every objective\'s step; one table, one '
                    'JSON (--out, default bench_suite.json); exit 1 if a check fails.')
  flags.DEFINE_list('rows', None, f'--suite: the configs/<name>.py rows to time (default: all '
                    f'of {",".join(bench_suite.ROWS)}; empty: none).')
  flags.DEFINE_bool('tiny', None, '--suite: the rows\' `tiny` argument (default on CPU); '
                    '--notiny: their paper rows (default on GPU/TPU).')
  flags.DEFINE_list('attention_shapes', None, '--suite: TOKENSxHEADSxHEAD_DIM shapes of the '
                    'kernel checks (default: paper shapes; on CPU 50x12x64,197x12x64; empty: '
                    'none).')
  flags.DEFINE_list('kernel_dtypes', None, '--suite: float32 and/or bfloat16 (default: both on '
                    'CPU, bfloat16 on GPU/TPU).')
  flags.DEFINE_integer('kernel_batch', None, '--suite: batch of the kernel checks (default: 2 '
                       'on CPU, 16 on GPU/TPU).')
  flags.DEFINE_integer('batch_per_device', None, '--suite: images per device of every row '
                       '(default: the tiny rows\' own batch; paper rows 128).')
  flags.DEFINE_enum('attention', None, ['xla', 'fused', 'pallas'], '--suite: model.attention '
                    'of every row (default: each row\'s own).')
  flags.DEFINE_float('tolerance_scale', 1.0, '--suite: multiplies the kernel tolerances '
                     '(0: any nonzero error fails).')
  flags.DEFINE_float('accelerator_img_per_s', 2400.0,
                     '--data: step rate (img/s per accelerator) at which to report the host '
                     'cores each accelerator needs.')


# Dense bf16 peaks per device (vendor figures); CPU: a stated estimate of fp32 FMA throughput
# at ~3 GHz (cpu_peak_tflops_per_core), so CPU MFU is only a rough sanity figure.
PEAK_TFLOPS = {'NVIDIA H100': 989.0, 'NVIDIA H200': 989.0, 'NVIDIA A100': 312.0,
               'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5p': 459.0, 'TPU v6 lite': 918.0}


def cpu_peak_tflops_per_core() -> float:
  """fp32 estimate at ~3 GHz: 2 FMA units × 16 lanes (AVX-512) = 0.2 TFLOP/s, else AVX2 0.1.

  (ViT-B/16 MAE reached 0.098 TFLOP/s per core on the 2-core AVX-512 EPYC we measured on, more
  than the AVX2 bound allows, so the AVX2 figure would give MFU ≈ 1.)
  """
  try:
    with open('/proc/cpuinfo') as f:
      flags = next((line for line in f if line.startswith('flags')), '')
  except OSError:
    flags = ''
  return 0.2 if ' avx512f' in flags else 0.1


def device_peak_tflops(device) -> float:
  """Peak TFLOP/s of one device from PEAK_TFLOPS (CPU: cpu_peak_tflops_per_core × cores)."""
  kind = device.device_kind
  for name, peak in PEAK_TFLOPS.items():
    if kind.startswith(name):
      return peak
  if device.platform == 'cpu':
    cores = os.cpu_count() or 1
    return cpu_peak_tflops_per_core() * cores / max(len(__import__('jax').devices()), 1)
  raise ValueError(f'unknown device {kind!r}: pass --peak_tflops')


def synthetic_batch(example: dict, batch_size: int) -> dict:
  """A batch shaped like `example` (leading dim 1) with deterministic random content."""
  import numpy as np
  rng = np.random.default_rng(0)
  def make(x):
    shape = (batch_size,) + x.shape[1:]
    if x.dtype == np.uint8:
      return rng.integers(0, 256, shape, dtype=np.uint8)
    if np.issubdtype(x.dtype, np.integer):
      return np.broadcast_to(x[:1], shape).copy()
    return rng.normal(size=shape).astype(x.dtype)
  return {k: make(np.asarray(v)) for k, v in example.items()}


# Image key → segment-map key, as mimjax.data.augment emits them ('lut' and 'mae' use 'image').
# crop_on='device': the map travels on its own canvas, cut on the device like the image's.
SEGMENT_KEYS = {'image': 'segments', 'global': 'segments_global', 'local': 'segments_local',
                'canvas': 'canvas_segments'}


def needs_segments(config) -> bool:
  """True when the step reads SAM segment maps: the MRE bias is on, or a KD teacher (an MRE
  model) reads them."""
  seg = config.model.get('segment_bias')
  return bool(seg is not None and seg.get('enabled')) or 'teacher' in config


def add_synthetic_segments(example: dict, num_ids: int) -> dict:
  """Adds random uint8 segment maps (ids < num_ids) shaped like every image in `example`.

  The synthetic data set has no segments; for timing only their shape matters.
  """
  import numpy as np
  rng = np.random.default_rng(1)
  out = dict(example)
  for image_key, seg_key in SEGMENT_KEYS.items():
    if image_key in example and seg_key not in example:
      shape = np.shape(example[image_key])[:-1]
      out[seg_key] = rng.integers(0, num_ids, shape, dtype=np.uint8)
  return out


def attention_backend(model_config) -> str:
  """What `model.attention` runs as here: 'einsum', 'pallas' (the MRE flash kernel; interpret
  mode on CPU), or the fused kernel ('cudnn' / 'xla')."""
  attention = model_config.get('attention', 'xla')
  if attention == 'pallas':
    return 'pallas'
  if attention != 'fused':
    return 'einsum'
  from mimjax.models.attention import fused_backend
  from mimjax.models.vit import DTYPES, model_dims
  dims = model_dims(model_config)
  return fused_backend(DTYPES[model_config.get('dtype', 'float32')],
                       dims['width'] // dims['num_heads'])


def host_peak_rss_gb() -> float:
  """Peak resident memory of this process (Linux ru_maxrss is in KiB): CPU runs' memory."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)


def bench_step(config, steps: int, warmup: int, peak_tflops=None) -> dict:
  """Times the jitted train step of `config` on a synthetic, device-resident batch."""
  import jax
  import numpy as np
  from mimjax.data import device_augment, pipeline
  from mimjax.objectives import base as objectives
  from mimjax import optim, sharding
  from mimjax.models.vit import describe_variant
  from mimjax.train import trainer

  jax.config.update('jax_threefry_partitionable', True)
  objective = objectives.load(config.objective).make(config)
  mesh = sharding.make_mesh(config.mesh)
  data_cfg = config.data.copy_and_resolve_references()
  with data_cfg.unlocked():
    data_cfg.name = 'synthetic'
    data_cfg.worker_count = 0
  loader = pipeline.make_loader(data_cfg, global_batch_size=max(jax.device_count(), 8),
                                seed=0, train=True)
  example = jax.tree.map(lambda x: np.asarray(x[:1]), next(loader))
  if needs_segments(config):
    example = pipeline.to_patch_ids(
        add_synthetic_segments(example, config.model.segment_bias.num_ids), config.data)
  batch = sharding.put_batch(synthetic_batch(example, config.batch_size), mesh)
  if pipeline.crops_on_device(config.data):  # boxes must lie on the canvas: ship the loader's
    batch = sharding.put_batch(jax.tree.map(
        lambda x: np.repeat(np.asarray(x), config.batch_size, axis=0), example), mesh)
  step_example = example  # what the step takes (the loader's batch of one)
  example = device_augment.objective_example(config.data, example)
  rng = jax.random.key(0)
  params_shape = jax.eval_shape(lambda r: objective.init(r, example)[0], rng)
  # Schedules only shape the lr curve; epoch-based knobs (DINO's last-layer freeze) need a
  # data-set size, here the synthetic one's.
  tx, lr = optim.make_optimizer(config.optim, params_shape, total_steps=1000, warmup_steps=10,
                                batch_size=config.batch_size,
                                num_examples=pipeline.num_examples(data_cfg, 'train'))
  init_fn = sharding.traced_on(mesh,
                               lambda r: trainer.init_train_state(objective, tx, r, example))
  shardings = sharding.tree_shardings(mesh, jax.eval_shape(init_fn, rng),
                                      config.get('fsdp_min_size', 2 ** 16))
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  augment = device_augment.for_config(config.data)
  step = jax.jit(sharding.traced_on(mesh, trainer.make_train_step(
                    objective, tx, lr, config.get('grad_accum', 1), augment)),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  flops = compiled_flops(compiled)
  augment_flops = 0.0
  if augment is not None:  # the same program's share: compiled alone, same batch sharding
    augment_flops = compiled_flops(jax.jit(augment, in_shardings=(
        sharding.batch_sharding(mesh), None)).lower(batch, rng).compile())
  # XLA's cost analysis is per device program: scale to the global batch. Scanned layers: the
  # unrolled step's (the analysis counts a scan's body once).
  whole = trainer.whole_step_flops(config, step_example,
                                   pipeline.num_examples(data_cfg, 'train'))
  if whole is not None:
    flops = whole / jax.device_count()
  flops_per_img = flops * jax.device_count() / config.batch_size
  for _ in range(warmup):
    state, m = compiled(state, batch)
  jax.block_until_ready(state)
  t, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t) / steps
  step_cpu_s = (time.process_time() - cpu) / steps  # every thread of this process
  img_s = config.batch_size / step_s
  peak = (peak_tflops or device_peak_tflops(jax.devices()[0])) * 1e12 * jax.device_count()
  mem = jax.devices()[0].memory_stats() or {}
  return {
      'objective': config.objective, 'variant': describe_variant(config.model),
      'image_size': config.model.image_size, 'dtype': config.model.get('dtype', 'float32'),
      'attention': config.model.get('attention', 'xla'),
      'attention_backend': attention_backend(config.model),
      'batch_size': config.batch_size,
      'devices': jax.device_count(), 'device_kind': jax.devices()[0].device_kind,
      'compile_s': round(compile_s, 2), 'step_ms': round(step_s * 1e3, 3),
      'step_cpu_ms': round(step_cpu_s * 1e3, 3),
      'img_per_s': round(img_s, 1), 'gflops_per_img': round(flops_per_img / 1e9, 3),
      'device_augment': 'none' if augment is None else config.data.augment,
      'augment_flops_share': round(augment_flops / flops, 5) if flops else None,
      'mfu': round(flops_per_img * img_s / peak, 4) if flops else None,
      'peak_tflops_total': peak / 1e12,
      'peak_mem_gb': round(mem['peak_bytes_in_use'] / 2 ** 30, 2)
      if 'peak_bytes_in_use' in mem else None,
      'peak_host_rss_gb': host_peak_rss_gb(),
      'final_loss': float(m['loss']),
  }


def compiled_flops(compiled) -> float:
  """XLA's cost-analysis FLOPs of a compiled program (per device program); 0 if unknown."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) if cost else 0.0


def bench_data(config, steps: int, rounds: int, accelerator_img_per_s: float,
               torch_reference: bool = False) -> dict:
  """Host input pipeline: wall img/s of the configured loader, then CPU ms per image (process
  time, in line, one thread) as the median of `rounds` rounds of `steps` batches each; with
  `torch_reference`, each round also times the official torchvision pipeline on the same
  images (interleaved, so load changes hit both alike)."""
  import numpy as np
  from mimjax.data import pipeline
  result = pipeline.benchmark_loader(config.data, config.batch_size, steps)
  maker = pipeline.batch_maker(config.data, global_batch_size=config.batch_size, seed=0)
  transform = None
  if torch_reference:
    from mimjax import bench_torch
    transform = bench_torch.official_transform(config.data)
    if transform is None:
      raise ValueError(f'--torch with --data: no official pipeline for data.augment='
                       f'{config.data.augment!r} (have: mae, dino)')
  # One untimed batch each first: opening the record files and first-call set-up are not per
  # image (the first timed round was 20-40 % slower without it).
  warm = rounds * steps
  maker(warm)
  if transform is not None:
    bench_torch.official_cpu_seconds(
        transform, pipeline.encoded_images(config.data, maker.plan(warm)[0]))
  ours, theirs = [], []
  for r in range(rounds):
    batches = range(r * steps, (r + 1) * steps)
    images = maker.batch * steps
    ours.append(pipeline.host_cpu_seconds(maker, batches) * 1e3 / images)
    if transform is not None:
      encoded = pipeline.encoded_images(
          config.data, np.concatenate([maker.plan(b)[0] for b in batches]))
      theirs.append(bench_torch.official_cpu_seconds(transform, encoded, seed=r) * 1e3 / images)
  cpu_ms = float(np.median(ours))
  result.update({
      'augment_on': config.data.augment_on,
      'device_photometric': pipeline.photometric_on_device(config.data),
      'crop_on': config.data.crop_on,
      'cpu_ms_per_img': round(cpu_ms, 3), 'cpu_ms_per_img_rounds': [round(x, 3) for x in ours],
      'accelerator_img_per_s': accelerator_img_per_s,
      'host_cores_per_accelerator': round(cpu_ms * accelerator_img_per_s / 1e3, 1)})
  if theirs:
    torch_ms = float(np.median(theirs))
    result['torch'] = {
        'pipeline': {'mae': 'MAE transform_train', 'dino': 'DataAugmentationDINO'}[
            config.data.augment],
        'cpu_ms_per_img': round(torch_ms, 3), 'cpu_ms_per_img_rounds': [round(x, 3) for x in theirs],
        'host_cores_per_accelerator': round(torch_ms * accelerator_img_per_s / 1e3, 1)}
    result['torch_over_mimjax_cpu'] = round(torch_ms / cpu_ms, 2)
  return result


def compare_with_torch(config, steps: int, warmup: int, mode: str, peak_tflops=None,
                       torch_threads=None) -> dict:
  """JAX step and PyTorch MAE step on the same device and batch; adds `jax_over_torch`."""
  from mimjax import bench_torch
  torch_result = bench_torch.bench_torch(config, steps, warmup, mode, threads=torch_threads)
  # torch runs first and frees its cache, so JAX's GPU preallocation finds the memory free.
  import torch
  if torch.cuda.is_available():
    torch.cuda.empty_cache()
  return with_torch(bench_step(config, steps, warmup, peak_tflops), torch_result)


def with_torch(result: dict, torch_result: dict, jax_devices: int = 1) -> dict:
  """`result` with the PyTorch run nested as `torch` and `jax_over_torch` = JAX img/s ÷
  `jax_devices` ÷ PyTorch img/s (None when the PyTorch run has no rate: skipped or failed)."""
  rate = torch_result.get('img_per_s')
  ratio = round(result['img_per_s'] / jax_devices / rate, 3) if rate else None
  return dict(result, torch=torch_result, jax_over_torch=ratio)


def print_table(result: dict, indent: str = '') -> None:
  """One `key  value` line per entry; nested dicts (the torch run) indented below their key."""
  width = max(len(k) for k in result)
  for k, v in result.items():
    if isinstance(v, dict):
      print(f'{indent}{k}:')
      print_table(v, indent + '  ')
    else:
      print(f'{indent}{k:<{width}}  {v}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from mimjax import logs
  logs.quiet_library_logs()
  from mimjax import cli
  f = flags.FLAGS
  if f.suite:
    sys.exit(run_suite(f))
  if f.make_jpegs:
    from mimjax.data.builders import embedded
    n = embedded.write_photo_jpegs(f.make_jpegs)
    print(f'wrote {n} JPEGs to {f.make_jpegs}')
    return
  config = cli.config_value(f['config'], 'mimjax.bench')
  torch_mode = None if f.torch == 'none' else f.torch
  try:
    from mimjax.validate import validate_config
    validate_config(config)  # the trainer's start-up checks (e.g. an unknown model.attention)
    if f.data:
      result = bench_data(config, max(f.steps, 1), max(f.rounds, 1), f.accelerator_img_per_s,
                          torch_reference=bool(torch_mode))
      result['peak_host_rss_gb'] = host_peak_rss_gb()
    elif torch_mode:
      result = compare_with_torch(config, f.steps, f.warmup, torch_mode, f.peak_tflops,
                                  f.torch_threads)
    else:
      result = bench_step(config, f.steps, f.warmup, f.peak_tflops)
  except (ValueError, FileNotFoundError) as e:  # bad config: one line, not a traceback
    cli.fail('mimjax.bench', str(e))
  print_table(result)
  print(json.dumps(result))
  if f.json:
    with open(f.json, 'w') as out:
      json.dump(result, out, indent=2)


def run_suite(f) -> int:
  """--suite: options from the flags (one error line for bad ones), then the suite's status."""
  from mimjax import cli
  if f['config'].present or f.data or f.make_jpegs:
    cli.fail('mimjax.bench', '--suite takes --rows/--tiny, not --config, --data or --make_jpegs')
  out = f.json or 'bench_suite.json'
  if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    cli.fail('mimjax.bench', f'--out {out}: no such directory')
  dtypes = f.kernel_dtypes
  if dtypes is not None and not set(dtypes) <= set(bench_suite.TOLERANCE):
    cli.fail('mimjax.bench', f'--kernel_dtypes {",".join(dtypes)}: expected float32 and/or '
                             'bfloat16')
  # JAX takes 75 % of GPU memory when it starts unless told not to; the PyTorch reference runs
  # in this process too. (Read when the backend starts: nothing has started it yet.)
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  import jax
  try:
    options = bench_suite.SuiteOptions.for_platform(
        jax.default_backend(), tiny=f.tiny, rows=f.rows,
        attention_shapes=(None if f.attention_shapes is None else
                          [bench_suite.parse_shape(s) for s in f.attention_shapes]),
        kernel_dtypes=dtypes, kernel_batch=f.kernel_batch,
        batch_per_device=f.batch_per_device, attention=f.attention, steps=max(f.steps, 1),
        warmup=f.warmup, torch=None if f.torch == 'none' else (f.torch or 'eager'),
        torch_threads=f.torch_threads, peak_tflops=f.peak_tflops,
        tolerance_scale=f.tolerance_scale)
  except ValueError as e:
    cli.fail('mimjax.bench', str(e))
  return bench_suite.main(options, out)


if __name__ == '__main__':
  from mimjax import cli
  define_flags()
  cli.run_absl(main, 'mimjax.bench')
