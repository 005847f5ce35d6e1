"""Compile-time plan of a training run: per-device memory, FLOPs and collectives, no data.

  python -m mimjax.plan --config configs/mae.py:vit_b,in1k,1600ep --devices 64 \
      --per_device_batch 2
  python -m mimjax.plan --config configs/mae.py:tiny --target tpu:v5e:2x2

Builds the trainer's exact train step (mimjax.train.trainer.build_step) for the row's model,
image size and global batch, and compiles it ahead of time on abstract inputs
(jax.ShapeDtypeStruct; params and optimizer state come from jax.eval_shape: no data set, no
weights) for one of two targets:
- `--devices N` (default 8): N fake CPU devices (XLA_FLAGS, set before jax is imported),
  compiled by XLA:CPU;
- `--target tpu:TOPOLOGY` (any name jax.experimental.topologies accepts: v5e:2x2, v5e:16x16,
  v4:2x2x2, v5p:4x4x4, v6e:4x4): every chip of that TPU slice as compile-only devices from
  libtpu (the [dev] extra), compiled by XLA:TPU (and Mosaic for Pallas kernels) on this host,
  no TPU attached. Figures are then the TPU compiler's, and the fit is against the chip's HBM
  less HBM_RESERVE; when it does not fit, `alternatives` (remat, FSDP over every chip,
  gradient accumulation) are each compiled and their peaks printed.
It reports per device: parameter + optimizer-state bytes (from the state's shardings), the
compiled program's argument/temporary bytes (compiled.memory_analysis()), FLOPs
(compiled.cost_analysis()), the collectives in the program (count and result bytes by kind),
batch-shaped all-gathers and whether the peak fits.

`--per_device_batch b` compiles with b images per device instead of the row's
batch_size / devices (compiling ViT-B at 64 images per device takes long on a small CPU).
The step is then compiled at b and at 2b, and every batch-dependent figure (FLOPs,
temporaries, peak) is extrapolated linearly to the row's per-device batch B:
x(B) = x(b) + (x(2b) − x(b))·(B − b)/b; the table says so. Parameter and optimizer-state
bytes do not depend on the batch. Helpers (compile_step, collectives, batch_all_gathers) are
shared with tests/test_scale.py and mimjax.bench.
"""

import os
import re
import sys


def fake_cpu_devices(n: int) -> None:
  """Makes jax (not yet imported) see `n` CPU devices; must run before `import jax`."""
  if 'jax' in sys.modules:
    raise RuntimeError('mimjax.plan: jax was imported before the device count was set')
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 os.environ.get('XLA_FLAGS', ''))
  os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'


def _devices_from_argv(argv) -> int:
  """--devices, read before absl parses the flags (a bad value: 8 here, absl's one-line
  error later)."""
  for i, arg in enumerate(argv):
    value = (arg.split('=', 1)[1] if arg.startswith('--devices=') else
             argv[i + 1] if arg == '--devices' and i + 1 < len(argv) else None)
    if value is not None:
      return int(value) if value.isdigit() and int(value) > 0 else 8
  return 8


if __name__ == '__main__':  # before jax is imported anywhere
  fake_cpu_devices(_devices_from_argv(sys.argv))

import contextlib  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import Any, NamedTuple, Optional  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from mimjax import sharding  # noqa: E402
from mimjax.data import pipeline  # noqa: E402
from mimjax.objectives import base as objectives  # noqa: E402
from mimjax.train import trainer  # noqa: E402

# Training-split sizes of the data sets paper rows name, so a plan needs no data on disk
# (they only size the schedules, which do not change the compiled program's shapes).
TRAIN_SIZES = {'imagenet2012': 1281167, 'imagenet100': 126689}
ACCELERATORS = {'H100 80GB': 80e9, 'TPU v4 32GB': 32e9, 'TPU v5e 16GB': 16e9,
                'TPU v5p 95GB': 95e9}
COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all',
               'collective-permute')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
          'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
# `%name = <result type> <op>(` ; async pairs count once, at their -start.
_OP = re.compile(r'=\s*(.+?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
_ARRAY = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([\d,]*)\]')


class Collective(NamedTuple):
  kind: str
  shapes: tuple  # result array shapes (a tuple result has several)
  bytes: int


def collectives(hlo_text: str) -> list:
  """Every collective op of a compiled HLO module (compiled.as_text()) with its result shapes
  and bytes (the -done halves of async pairs are not counted again)."""
  out = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    shapes, size = [], 0
    for dtype, dims in _ARRAY.findall(m.group(1)):
      shape = tuple(int(d) for d in dims.split(',') if d)
      shapes.append(shape)
      size += _BYTES[dtype] * math.prod(shape)
    out.append(Collective(m.group(2), tuple(shapes), size))
  return out


def collective_summary(ops: list) -> dict:
  """{kind: {'count': n, 'bytes': total result bytes}} over `collectives(...)`."""
  out = {}
  for op in ops:
    entry = out.setdefault(op.kind, {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += op.bytes
  return out


def batch_all_gathers(hlo_text: str, global_batch: int) -> list:
  """All-gathers whose result has a dimension that is a multiple of the global batch: the
  whole batch (or all its crops) gathered onto every device instead of staying split."""
  return [op for op in collectives(hlo_text) if op.kind == 'all-gather'
          and any(d >= global_batch and d % global_batch == 0 for s in op.shapes for d in s)]


def scaling_problems(step: 'Compiled', n: int, global_batch: int,
                     tolerance: float = 0.15, whole_flops: Optional[float] = None) -> list:
  """What keeps a step compiled on n devices from dividing its work: per-device FLOPs off 1/n
  of the whole step's by more than `tolerance`, and batch-shaped all-gathers. The whole
  step's FLOPs are `whole_flops` (a 1-device compile's) or else `step.global_flops` (the
  unpartitioned program's; within 1 % of a 1-device compile on CPU, tests/test_scale.py;
  None for TPU). Empty when the step splits its batch over the devices."""
  f1, fn = whole_flops or step.global_flops, flops(step.compiled)
  if f1 is None:
    raise ValueError('scaling_problems: no whole-step FLOPs (a TPU lowering has no cost '
                     'analysis): pass whole_flops from a 1-device compile')
  problems = []
  ratio = fn * n / f1 if f1 else float('inf')
  if abs(ratio - 1) > tolerance:
    problems.append(f'per-device FLOPs on {n} devices: {fn:.4g} = {ratio:.2f} × (1/{n} of the '
                    f'whole step\'s {f1:.4g}); expected within {tolerance:.0%} of 1/{n}')
  gathers = batch_all_gathers(step.compiled.as_text(), global_batch)
  if gathers:
    problems.append(f'{len(gathers)} all-gather(s) of batch-shaped arrays (global batch '
                    f'{global_batch}), e.g. result {gathers[0].shapes}')
  return problems


def needs_segments(config: ml_collections.ConfigDict) -> bool:
  """True when the model reads SAM segment ids (the MRE bias or a KD teacher with it)."""
  seg = config.model.get('segment_bias')
  return bool(seg is not None and seg.get('enabled')) or config.get('objective') == 'distill'


def tree_bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


class Compiled(NamedTuple):
  compiled: Any           # jax.stages.Compiled
  built: trainer.BuiltStep
  batch: dict             # the abstract batch it was compiled for
  lower_s: float
  compile_s: float
  global_flops: Optional[float]  # the whole step's FLOPs: cost analysis of the program before
                          # SPMD partitioning (what one device would do alone), no extra
                          # compile; None for TPU (compile on one chip for the reference)
  unrolled_flops: Optional[float] = None  # scanned layers: the whole step's FLOPs unrolled
                          # (trainer.whole_step_flops), as the two above count a scan once


def compile_step(config: ml_collections.ConfigDict, mesh,
                 objective: Optional[objectives.Objective] = None,
                 num_train: Optional[int] = None) -> Compiled:
  """Compiles the trainer's train step for `config` (global batch config.batch_size) on
  `mesh` from abstract inputs: a blank example gives the batch's shapes, no data is read."""
  jax.config.update('jax_threefry_partitionable', True)  # as the trainer
  objective = objective or objectives.load(config.objective).make(config)
  example = pipeline.blank_example(config.data, segments=needs_segments(config))
  if num_train is None:
    num_train = pipeline.num_examples(config.data, 'train')
  built = trainer.build_step(config, objective, mesh, example, num_train)
  batch = sharding.abstract_batch(example, config.batch_size, mesh)
  t0 = time.perf_counter()
  lowered = built.step_fn.lower(built.abstract, batch)
  t1 = time.perf_counter()
  with _cache_off_unless(set(mesh.devices.flat) <= set(jax.devices())):
    compiled = lowered.compile()
  return Compiled(compiled, built, batch, t1 - t0, time.perf_counter() - t1, flops(lowered),
                  trainer.whole_step_flops(config, example, num_train))


@contextlib.contextmanager
def _cache_off_unless(runnable: bool):
  """The persistent compilation cache off unless the devices are this host's: an executable
  for compile-only devices (a TPU topology on a CPU host) cannot be loaded back (jax warns
  'PjRtCompiler must be constructed with a Client'), so it is neither written nor read."""
  old = jax.config.jax_enable_compilation_cache
  if not runnable:
    jax.config.update('jax_enable_compilation_cache', False)
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', old)


def flops(compiled) -> Optional[float]:
  """FLOPs of a compiled program per device, or of a lowered one in all (XLA cost analysis);
  None where the backend gives none (a TPU lowering: the compiled program's are per chip)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return None if cost is None else float(cost.get('flops', 0.0))


def mesh_of(n: int):
  """A ('data', 'fsdp') mesh over the first n devices, as config.mesh.devices=n gives."""
  return sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'devices': n}))


def plan_config(config: ml_collections.ConfigDict,
                batch_size: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config to compile: the row's own except the data set, swapped for 'synthetic' of the
  same size (no files needed; the step's shapes come from image_size/augment), and
  `batch_size` when given."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    data = config.data
    if data.name not in ('digits', 'photos', 'synthetic'):
      size = TRAIN_SIZES.get(data.name)
      if size is None:
        size = pipeline.num_examples(data, 'train')
      data.name, data.synthetic_size = 'synthetic', size
    if batch_size is not None:
      config.batch_size = batch_size
  return config


def measure(config: ml_collections.ConfigDict, mesh) -> dict:
  """One ahead-of-time compile of `config`'s step on `mesh` → per-device figures."""
  c = compile_step(config, mesh)
  mem = c.compiled.memory_analysis()
  hlo = c.compiled.as_text()
  ts = c.built.abstract
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  return {
      'per_device_batch': config.batch_size // mesh.size,
      'params_bytes': tree_bytes_per_device(ts['params']),
      'opt_state_bytes': tree_bytes_per_device(ts['opt_state']),
      'objective_state_bytes': tree_bytes_per_device(ts['state']),
      'batch_bytes': tree_bytes_per_device(c.batch),
      'argument_bytes': mem.argument_size_in_bytes,
      'temp_bytes': mem.temp_size_in_bytes,
      'peak_bytes': peak,
      # Per device: the compiled program's, or (scanned layers) the unrolled whole step's share.
      'flops': flops(c.compiled) if c.unrolled_flops is None else c.unrolled_flops / mesh.size,
      'collectives': collective_summary(collectives(hlo)),
      'batch_all_gathers': len(batch_all_gathers(hlo, config.batch_size)),
      'lower_s': round(c.lower_s, 1), 'compile_s': round(c.compile_s, 1),
  }


SCALED = ('batch_bytes', 'argument_bytes', 'temp_bytes', 'peak_bytes', 'flops')
# HBM per TPU chip by device kind (Cloud TPU docs): v4 32 GB, v5e 16 GB, v5p 95 GB, v6e 32 GB.
TPU_HBM = {'TPU v4': 32e9, 'TPU v5 lite': 16e9, 'TPU v5': 95e9, 'TPU v6 lite': 32e9}
# Kept free of the plan's peak: the TPU runtime, program code, infeed buffers and allocator
# fragmentation are not in the compiler's figures.
HBM_RESERVE = 0.10


class Target(NamedTuple):
  """The devices a plan compiles for and what one of them holds."""
  name: str          # 'cpu' (fake devices) or 'tpu:TOPOLOGY'
  devices: list
  kind: str          # device_kind of the first device
  hbm_bytes: Optional[float]  # per device (a v4 topology lists each chip's 2 cores apart)


def tpu_target(topology: str) -> Target:
  """Every device of a TPU topology ('v5e:2x2', 'v4:2x2x2', ...), compile-only, from libtpu
  on this host (no TPU attached). Raises ValueError with one line when it cannot."""
  import importlib.util
  if importlib.util.find_spec('libtpu') is None:
    raise ValueError(f'--target=tpu:{topology} needs libtpu, the TPU compiler: '
                     'pip install -e ".[dev]" (or ".[tpu]")')
  from jax.experimental import topologies
  try:
    devices = topologies.get_topology_desc(topology_name=topology, platform='tpu').devices
  except Exception as e:  # jax reports a bad name as a runtime error of the plugin
    raise ValueError(f'--target=tpu:{topology}: not a TPU topology libtpu knows (e.g. '
                     f'v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:4x4): {str(e).splitlines()[0]}')
  kind = devices[0].device_kind
  if kind not in TPU_HBM:
    raise ValueError(f'--target=tpu:{topology}: chip {kind!r} has no HBM size in '
                     f'mimjax.plan.TPU_HBM (known: {", ".join(TPU_HBM)})')
  cores = len(devices) // len({tuple(d.coords) for d in devices})
  return Target(f'tpu:{topology}', list(devices), kind, TPU_HBM[kind] / cores)


def parse_target(target: Optional[str], devices: int) -> Target:
  """--target ('tpu:TOPOLOGY', or None/'cpu' for `devices` fake CPU devices) → Target."""
  if target in (None, '', 'cpu'):
    if len(jax.devices()) < devices:
      raise ValueError(f'--devices={devices}: jax sees {len(jax.devices())} devices (run as '
                       '`python -m mimjax.plan`, which fakes them before jax starts)')
    return Target('cpu', jax.devices()[:devices], jax.devices()[0].device_kind, None)
  platform, _, topology = target.partition(':')
  if platform != 'tpu' or not topology:
    raise ValueError(f'--target={target}: expected tpu:TOPOLOGY (e.g. tpu:v5e:2x2) or cpu')
  return tpu_target(topology)


def _plan_on(config: ml_collections.ConfigDict, target: Target,
             per_device_batch: Optional[int]) -> dict:
  """Per-device figures of `config` on every device of `target` (see the module docstring)."""
  devices = len(target.devices)
  if config.batch_size % devices:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{devices} devices (--devices={devices} or --target)')
  mesh_cfg = config.mesh.copy_and_resolve_references()
  with mesh_cfg.unlocked():
    mesh_cfg.devices = devices
  mesh = sharding.make_mesh(mesh_cfg, target.devices)
  true_b = config.batch_size // devices
  b = per_device_batch or true_b
  if b <= 0:
    raise ValueError(f'--per_device_batch={per_device_batch}: expected a positive int')
  first = measure(plan_config(config, b * devices), mesh)
  out = dict(first, devices=devices, global_batch=config.batch_size,
             per_device_batch=true_b, compiled_per_device_batch=[b])
  if b != true_b:
    second = measure(plan_config(config, 2 * b * devices), mesh)
    out['compiled_per_device_batch'].append(2 * b)
    for key in SCALED:
      out[key] = first[key] + (second[key] - first[key]) * (true_b - b) / b
    out['collectives'] = second['collectives']  # counts do not depend on the batch
    out['batch_all_gathers'] = max(first['batch_all_gathers'], second['batch_all_gathers'])
    out['compile_s'] = round(first['compile_s'] + second['compile_s'], 1)
    out['lower_s'] = round(first['lower_s'] + second['lower_s'], 1)
  return out


def _budget_name(target: Target) -> str:
  return (f'{target.kind} {_size(target.hbm_bytes)} − {HBM_RESERVE:.0%} reserve '
          f'= {_size(target.hbm_bytes * (1 - HBM_RESERVE))}')


def _fits(p: dict, target: Target) -> dict:
  """{memory: peak fits}: the target's HBM less the reserve, or (fake CPU devices) each of
  ACCELERATORS."""
  if target.hbm_bytes is None:
    return {name: p['peak_bytes'] <= cap for name, cap in ACCELERATORS.items()}
  return {_budget_name(target): p['peak_bytes'] <= target.hbm_bytes * (1 - HBM_RESERVE)}


def alternatives(config: ml_collections.ConfigDict, devices: int) -> list:
  """What may make a row fit, as (--config overrides, config): rematerialised blocks, FSDP
  over every device, and the same global batch in 2 and 4 micro-batches (gradient
  accumulation: a smaller batch per device and pass)."""
  out = []

  def variant(flag: str, key: str, value) -> None:
    c = config.copy_and_resolve_references()
    node, _, leaf = key.rpartition('.')
    with c.unlocked():
      setattr(c[node] if node else c, leaf, value)
    out.append((flag, c))

  if not config.model.get('remat'):
    variant('--config.model.remat=True', 'model.remat', True)
  if int(config.mesh.get('fsdp', 1)) < devices:
    variant(f'--config.mesh.fsdp={devices}', 'mesh.fsdp', devices)
  accum = int(config.get('grad_accum', 1))
  for k in (2, 4):
    if config.batch_size % (devices * accum * k) == 0:
      variant(f'--config.grad_accum={accum * k}', 'grad_accum', accum * k)
  return out


def plan(config: ml_collections.ConfigDict, devices: int = 8,
         per_device_batch: Optional[int] = None, target: Optional[str] = None,
         suggest: bool = True) -> dict:
  """Per-device plan of `config` on `devices` fake CPU devices, or on every chip of `target`
  ('tpu:v5e:2x2': compiled by XLA:TPU on this host); see the module docstring. When the peak
  does not fit and `suggest`, every one of `alternatives` is compiled the same way and its
  peak and fit listed under 'alternatives'."""
  tgt = parse_target(target, devices)
  out = _plan_on(config, tgt, per_device_batch)
  out.update(target=tgt.name, device_kind=tgt.kind, fits=_fits(out, tgt))
  if suggest and not all(out['fits'].values()):
    out['alternatives'] = []
    for flag, alt in alternatives(config, len(tgt.devices)):
      p = _plan_on(alt, tgt, per_device_batch)
      out['alternatives'].append({'flag': flag, 'peak_bytes': p['peak_bytes'],
                                  'fits': all(_fits(p, tgt).values())})
  return out


def _size(x: float) -> str:
  return f'{x / 1e9:.2f} GB' if x >= 1e9 else f'{x / 1e6:.1f} MB'


def format_plan(name: str, p: dict) -> str:
  """The plan as a markdown table (what docs/performance.md shows), then the checked
  alternatives when it does not fit."""
  coll = ', '.join(f'{k}: {v["count"]} ops, {_size(v["bytes"])} in all'
                   for k, v in sorted(p['collectives'].items())) or 'none'
  fits = ', '.join(f'{k}: {"yes" if ok else "no"}' for k, ok in p['fits'].items())
  compiled = ' and '.join(str(b) for b in p['compiled_per_device_batch'])
  if len(p['compiled_per_device_batch']) > 1:
    compiled += ' per device; batch-dependent figures extrapolated linearly'
  else:
    compiled += ' per device'
  rows = [
      ('config', name),
      ('compiled for', f'{p.get("target", "cpu")} ({p.get("device_kind", "?")})'),
      ('devices × per-device batch', f'{p["devices"]} × {p["per_device_batch"]} '
       f'(global {p["global_batch"]}; compiled at {compiled})'),
      ('params', _size(p['params_bytes'])),
      ('optimizer state', _size(p['opt_state_bytes'])),
      ('objective state (EMA teacher, center, ...)', _size(p['objective_state_bytes'])),
      ('batch', _size(p['batch_bytes'])),
      ('arguments (state + batch, as compiled)', _size(p['argument_bytes'])),
      ('temporaries (activations, gradients)', _size(p['temp_bytes'])),
      ('peak = arguments + outputs − aliased + temporaries', _size(p['peak_bytes'])),
      ('GFLOP per step', f'{p["flops"] / 1e9:.4g}'),
      ('collectives (ops, result bytes of all of them)', coll),
      ('batch-shaped all-gathers', str(p['batch_all_gathers'])),
      ('fits', fits),
      ('lower / compile (s)', f'{p["lower_s"]} / {p["compile_s"]}'),
  ]
  lines = ['| per device | |', '|---|---|'] + [f'| {k} | {v} |' for k, v in rows]
  if p.get('alternatives') is not None:
    lines.append('\nDoes not fit. Alternatives, each compiled the same way (peak per device):')
    lines += [f'- {a["flag"]}: {_size(a["peak_bytes"])}, '
              f'{"fits" if a["fits"] else "does not fit"}' for a in p['alternatives']]
  return '\n'.join(lines)


def main(argv) -> None:
  from absl import flags
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from mimjax import cli
  from mimjax import logs
  logs.quiet_library_logs()
  config = cli.config_value(flags.FLAGS['config'], 'mimjax.plan')
  try:
    p = plan(config, f.devices, f.per_device_batch, f.target)
  except (ValueError, FileNotFoundError) as e:
    cli.fail('mimjax.plan', str(e))
  print(format_plan(_config_name(), p))
  if f.json:
    import json
    with open(f.json, 'w') as out:
      json.dump(p, out, indent=2)


def _config_name() -> str:
  for i, arg in enumerate(sys.argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(sys.argv):
      return sys.argv[i + 1]
  return '?'


if __name__ == '__main__':
  from absl import app
  from absl import flags
  from ml_collections import config_flags
  from mimjax import cli
  config_flags.DEFINE_config_file('config', None, 'configs/X.py:ARG', lock_config=True)
  flags.DEFINE_integer('devices', 8, 'Simulated devices (the mesh is data × fsdp over them).')
  flags.DEFINE_integer('per_device_batch', None,
                       'Compile with this many images per device (and twice as many) and '
                       'extrapolate batch-dependent figures linearly to the row\'s batch.')
  flags.DEFINE_string('json', None, 'Also write the plan as JSON to this path.')
  flags.DEFINE_string('target', None, 'tpu:TOPOLOGY (e.g. tpu:v5e:2x2): compile for that TPU '
                      'slice with XLA:TPU on this host (needs libtpu); default: --devices.')
  flags.mark_flag_as_required('config')
  cli.run_absl(main, 'mimjax.plan')
