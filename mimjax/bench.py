"""Throughput benchmark: train-step img/s, step time, FLOPs/img, MFU, memory; loader img/s.

  python -m mimjax.bench --config configs/mae.py:tiny
  python -m mimjax.bench --config configs/mae.py:vit_b --config.batch_size=256 \
      --config.model.dtype=bfloat16 --config.model.attention=fused --steps 20
  python -m mimjax.bench --config configs/mae.py:tiny --data   # input pipeline only

The step runs on synthetic device-resident data (no data set needed), so it measures the
model step alone; `--data` measures the host input pipeline alone.
"""

import json
import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/X.py:ARG', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_DATA = flags.DEFINE_bool('data', False, 'Benchmark the input pipeline instead of the step.')
_PEAK = flags.DEFINE_float('peak_tflops', None, 'Peak TFLOP/s per device for MFU '
                           '(default: a table of known accelerators, see PEAK_TFLOPS).')
_JSON = flags.DEFINE_string('json', None, 'Also write the result as JSON to this path.')

# Dense bf16 peaks per device (vendor figures); CPU: a stated estimate of 2×AVX2-FMA fp32 at
# ~3 GHz = 0.1 TFLOP/s per core, so CPU MFU is only a rough sanity figure.
PEAK_TFLOPS = {'NVIDIA H100': 989.0, 'NVIDIA H200': 989.0, 'NVIDIA A100': 312.0,
               'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5p': 459.0, 'TPU v6 lite': 918.0}


def device_peak_tflops(device) -> float:
  """Peak TFLOP/s of one device from PEAK_TFLOPS (CPU: 0.1 per core of this host)."""
  kind = device.device_kind
  for name, peak in PEAK_TFLOPS.items():
    if kind.startswith(name):
      return peak
  if device.platform == 'cpu':
    return 0.1 * (os.cpu_count() or 1) / max(len(__import__('jax').devices()), 1)
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


def bench_step(config, steps: int, warmup: int, peak_tflops=None) -> dict:
  """Times the jitted train step of `config` on a synthetic, device-resident batch."""
  import jax
  import numpy as np
  from mimjax.data import pipeline
  from mimjax.objectives import base as objectives
  from mimjax.train import optim, sharding, trainer

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
  batch = sharding.put_batch(synthetic_batch(example, config.batch_size), mesh)
  rng = jax.random.key(0)
  params_shape = jax.eval_shape(lambda r: objective.init(r, example)[0], rng)
  tx, lr = optim.make_optimizer(config.optim, params_shape, total_steps=1000, warmup_steps=10,
                                batch_size=config.batch_size)
  init_fn = lambda r: trainer.init_train_state(objective, tx, r, example)
  shardings = sharding.tree_shardings(mesh, jax.eval_shape(init_fn, rng),
                                      config.get('fsdp_min_size', 2 ** 16))
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  step = jax.jit(trainer.make_train_step(objective, tx, lr, config.get('grad_accum', 1)),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  # XLA's cost analysis is per device program: scale to the global batch.
  flops_per_img = flops * jax.device_count() / config.batch_size
  for _ in range(warmup):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t) / steps
  img_s = config.batch_size / step_s
  peak = (peak_tflops or device_peak_tflops(jax.devices()[0])) * 1e12 * jax.device_count()
  mem = jax.devices()[0].memory_stats() or {}
  return {
      'objective': config.objective, 'variant': config.model.variant,
      'image_size': config.model.image_size, 'dtype': config.model.get('dtype', 'float32'),
      'attention': config.model.get('attention', 'xla'), 'batch_size': config.batch_size,
      'devices': jax.device_count(), 'device_kind': jax.devices()[0].device_kind,
      'compile_s': round(compile_s, 2), 'step_ms': round(step_s * 1e3, 3),
      'img_per_s': round(img_s, 1), 'gflops_per_img': round(flops_per_img / 1e9, 3),
      'mfu': round(flops_per_img * img_s / peak, 4) if flops else None,
      'peak_tflops_total': peak / 1e12,
      'peak_mem_gb': round(mem['peak_bytes_in_use'] / 2 ** 30, 2)
      if 'peak_bytes_in_use' in mem else None,
      'final_loss': float(m['loss']),
  }


def print_table(result: dict) -> None:
  width = max(len(k) for k in result)
  for k, v in result.items():
    print(f'{k:<{width}}  {v}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if _DATA.value:
    from mimjax.data import pipeline
    result = pipeline.benchmark_loader(config.data, config.batch_size, max(_STEPS.value, 1))
  else:
    result = bench_step(config, _STEPS.value, _WARMUP.value, _PEAK.value)
  print_table(result)
  print(json.dumps(result))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  app.run(main)
