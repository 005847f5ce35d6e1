"""`python -m mimjax.bench --suite`: the hardware-day check, in one process.

  python -m mimjax.bench --suite --rows mae --tiny --out /tmp/suite.json
  python -m mimjax.bench --suite                 # every row; CPU: tiny rows, GPU/TPU: paper rows

(a) Attention kernels: the Pallas kernel (`model.attention=pallas`; interpret mode on CPU) and
the fused path (`fused`: cuDNN on GPU, XLA's attention elsewhere) against the einsum path
(`xla`), each through mimjax's own `Attention` layer with the same parameters and inputs:
output and gradients (input, every parameter, u_pos, u_neg), with and without the MRE bias,
at the paper's attention shapes; error and time per call.
(b) Train steps: every objective's row timed by `bench.bench_step` (the trainer's jitted step
on a synthetic device-resident batch), the MAE row side by side with the PyTorch reference.
One JSON file (schema: docs/performance.md, "Benchmark suite") and one table on stdout; the
exit status is 1 when any record is not ok.
"""

import dataclasses
import importlib
import inspect
import json
import math
import os
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

# Every training objective's config (configs/<name>.py), in the issue's order.
ROWS = ('mae', 'mre_mae', 'dino', 'mre_dino', 'lut', 'semantic_mim', 'maskfeat', 'beit',
        'distill')
# (tokens, heads, head dim, where the paper runs it); batch from SuiteOptions.kernel_batch.
PAPER_ATTENTION = (
    (50, 12, 64, 'MAE/MRE-MAE-B/16 encoder: 49 visible + cls'),
    (197, 16, 32, 'MAE-B/16 decoder (512-d, 16 heads)'),
    (197, 12, 64, 'ViT-B/16 full grid (LUT, SemanticMIM, KD teacher); B/8 visible'),
    (197, 6, 64, 'DINO-S/16 global crop'),
    (37, 6, 64, 'DINO-S/16 local crop (96 px)'),
    (785, 12, 64, 'ViT-B/8 full grid (MRE-MAE-B/8 decoder length)'),
    (65, 16, 80, 'MAE-H/14 encoder: 64 visible + cls (head dim 80)'),
)
# On CPU the kernel runs in Pallas interpret mode (an emulator): the two B/16 encoder shapes.
CPU_ATTENTION = PAPER_ATTENTION[:1] + PAPER_ATTENTION[2:3]
# Error = ‖a − b‖₂ / ‖b‖₂ per quantity, against the einsum path in the same dtype. float32:
# the kernel tests' bound (tests/models/test_pallas_attention.py, F32_TOL). bfloat16: those
# tests bound each path within 2^-7 of float32 (2^-4 for d u, a sum of nearly cancelling dS
# terms), so two bf16 paths differ by at most twice that (triangle inequality).
TOLERANCE = {'float32': 1e-5, 'bfloat16': 2.0 ** -6}
DU_TOLERANCE = {'float32': 1e-5, 'bfloat16': 2.0 ** -3}
QUANTITIES = ('out', 'dx', 'dparams', 'du_pos', 'du_neg')
# What `model.attention=pallas` compiles to on each platform (no mesh: jax's default backend).
PALLAS_BACKENDS = {'cpu': 'pallas interpret', 'gpu': 'pallas triton', 'tpu': 'pallas mosaic'}


@dataclasses.dataclass(frozen=True)
class SuiteOptions:
  """What the suite runs; `for_platform` fills the per-platform defaults."""
  rows: Sequence[str] = ROWS
  tiny: bool = True
  attention_shapes: Sequence[tuple] = CPU_ATTENTION
  kernel_dtypes: Sequence[str] = ('float32', 'bfloat16')
  kernel_batch: int = 2
  batch_per_device: Optional[int] = None   # paper rows; None: the row's own (tiny rows)
  attention: Optional[str] = None          # model.attention for every row; None: the row's
  steps: int = 10
  warmup: int = 2
  torch: Optional[str] = 'eager'           # PyTorch MAE reference mode; None: off
  torch_threads: Optional[int] = None
  peak_tflops: Optional[float] = None
  tolerance_scale: float = 1.0             # × TOLERANCE (0: every nonzero error fails)

  @classmethod
  def for_platform(cls, platform: str, *, tiny: Optional[bool] = None,
                   rows: Optional[Sequence[str]] = None, attention_shapes=None,
                   kernel_dtypes=None, kernel_batch: Optional[int] = None,
                   batch_per_device: Optional[int] = None, **rest) -> 'SuiteOptions':
    """None = the platform's default. CPU: tiny rows, the two B/16 encoder shapes at batch 2,
    float32 and bf16. GPU/TPU: paper rows at 128 images per device, every paper shape at
    batch 16, bf16 (float32 matmuls may run as TF32 there, which no float32 bound survives)."""
    cpu = platform == 'cpu'
    rows = ROWS if rows is None else tuple(rows)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
      raise ValueError(f'--rows {",".join(unknown)}: unknown row; expected names from '
                       f'{",".join(ROWS)}')
    tiny = cpu if tiny is None else tiny
    pick = lambda given, default: default if given is None else given
    return cls(rows=rows, tiny=tiny,
               attention_shapes=tuple(pick(attention_shapes,
                                           CPU_ATTENTION if cpu else PAPER_ATTENTION)),
               kernel_dtypes=tuple(pick(kernel_dtypes, ('float32', 'bfloat16') if cpu
                                        else ('bfloat16',))),
               kernel_batch=pick(kernel_batch, 2 if cpu else 16),
               batch_per_device=pick(batch_per_device, None if tiny else 128), **rest)


def parse_shape(text: str) -> tuple:
  """'TxHxD' (tokens × heads × head dim) → (T, H, D, 'given'); one clear error otherwise."""
  parts = text.lower().split('x')
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f'--attention_shapes {text!r}: expected TOKENSxHEADSxHEAD_DIM, e.g. 197x12x64')
  return tuple(int(p) for p in parts) + ('given',)


# ------------------------------------------------------------------------ (a) kernel checks
def _timed(fn: Callable, args: tuple, calls: int) -> dict:
  """Wall and process (CPU) ms per call of a compiled `fn`, after one untimed call."""
  import jax
  jax.block_until_ready(fn(*args))
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return {'ms': round((time.perf_counter() - wall) * 1e3 / calls, 3),
          'cpu_ms': round((time.process_time() - cpu) * 1e3 / calls, 3)}


def _rel_err(got, want) -> float:
  """‖got − want‖₂ / ‖want‖₂ in float64 (0 when both are 0)."""
  import numpy as np
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  norm = np.linalg.norm(want)
  diff = np.linalg.norm(got - want)
  return float(diff / norm) if norm else float(diff)


def attention_paths(batch: int, tokens: int, heads: int, head_dim: int, dtype: str,
                    bias: bool, seed: int = 0):
  """(inputs, path) where path(implementation) → (forward fn, value-and-grad fn) of the
  `Attention` layer on those inputs; the bias ids (cls = 0, 4 segments) are inputs too."""
  import jax
  import jax.numpy as jnp
  from mimjax.models.attention import Attention
  from mimjax.models.segment_bias import SegmentTerms
  ks = jax.random.split(jax.random.key(seed), 6)
  width = heads * head_dim
  x = jax.random.normal(ks[0], (batch, tokens, width))
  cot = jax.random.normal(ks[1], (batch, tokens, width))  # a random cotangent: every grad
  ids = jax.random.randint(ks[2], (batch, tokens), 0, 5).at[:, 0].set(0)
  u_pos, u_neg = jax.random.normal(ks[3], (heads,)), jax.random.normal(ks[4], (heads,))
  layer = lambda impl: Attention(num_heads=heads, dtype=getattr(jnp, dtype), implementation=impl)
  params = jax.jit(layer('xla').init)(ks[5], x)['params']

  def path(impl: str):
    def forward(params, x, ids, u_pos, u_neg):
      segments = SegmentTerms(ids, u_pos, u_neg) if bias else None
      return layer(impl).apply({'params': params}, x, segments=segments)[0]

    def loss(params, x, u_pos, u_neg, ids, cot):
      out = forward(params, x, ids, u_pos, u_neg)
      return jnp.sum(out.astype(jnp.float32) * cot), out
    grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    return jax.jit(forward), jax.jit(grads)
  return (params, x, u_pos, u_neg, ids, cot), path


def _run_path(path: Callable, impl: str, inputs: tuple, calls: int) -> dict:
  """One implementation's output, gradients and times (forward; forward + backward)."""
  params, x, u_pos, u_neg, ids, _ = inputs
  fwd, grads = path(impl)
  (_, out), g = grads(*inputs)
  return {'out': out, 'grads': g, 'fwd': _timed(fwd, (params, x, ids, u_pos, u_neg), calls),
          'fwd_bwd': _timed(grads, inputs, calls)}


def kernel_errors(got: dict, want: dict, bias: bool) -> dict:
  """Relative L2 error of each quantity (dparams: the worst parameter)."""
  import jax
  (gp, gx, gup, gun), (wp, wx, wup, wun) = got['grads'], want['grads']
  errors = {'out': _rel_err(got['out'], want['out']), 'dx': _rel_err(gx, wx),
            'dparams': max(_rel_err(a, b) for a, b in zip(jax.tree.leaves(gp),
                                                          jax.tree.leaves(wp)))}
  if bias:  # without the bias u gets no gradient on either path
    errors.update(du_pos=_rel_err(gup, wup), du_neg=_rel_err(gun, wun))
  return errors


def attention_checks(options: SuiteOptions,
                     progress: Callable[[dict], None] = lambda record: None) -> list:
  """Kernel records: pallas and fused against the einsum path, per shape × dtype × bias."""
  import jax
  import jax.numpy as jnp
  from mimjax.models.attention import fused_backend
  records = []
  for tokens, heads, head_dim, where in options.attention_shapes:
    for dtype in options.kernel_dtypes:
      for bias in (True, False):
        inputs, path = attention_paths(options.kernel_batch, tokens, heads, head_dim, dtype,
                                       bias)
        want = None
        for impl in ('pallas', 'fused'):
          backend = (PALLAS_BACKENDS.get(jax.default_backend(), 'pallas') if impl == 'pallas'
                     else fused_backend(getattr(jnp, dtype), head_dim))
          record = {
              'kind': 'kernel',
              'name': f'{impl}{"+mre" if bias else ""} {tokens}x{heads}x{head_dim} {dtype}',
              'config': {'attention': impl, 'backend': backend, 'reference': 'xla',
                         'mre_bias': bias, 'dtype': dtype},
              'devices': 1, 'device_kind': jax.devices()[0].device_kind,
              'shapes': {'batch': options.kernel_batch, 'tokens': tokens, 'heads': heads,
                         'head_dim': head_dim, 'where': where}}
          try:
            want = want or _run_path(path, 'xla', inputs, options.steps)
            got = _run_path(path, impl, inputs, options.steps)
          except Exception as e:  # pylint: disable=broad-except  (recorded, suite goes on)
            records.append(dict(record, numbers={}, ok=False, error=one_line(e)))
            progress(records[-1])
            continue
          errors = kernel_errors(got, want, bias)
          tol = TOLERANCE[dtype] * options.tolerance_scale
          du_tol = DU_TOLERANCE[dtype] * options.tolerance_scale
          bound = lambda k: du_tol if k.startswith('du') else tol
          records.append(dict(record, numbers={
              'errors': {k: float(f'{e:.3g}') for k, e in errors.items()},
              'max_err': float(f'{max(errors.values()):.3g}'),
              'tolerance': tol, 'du_tolerance': du_tol if bias else None,
              'fwd': got['fwd'], 'fwd_bwd': got['fwd_bwd'],
              'reference_fwd': want['fwd'], 'reference_fwd_bwd': want['fwd_bwd']},
              ok=all(math.isfinite(e) and e <= bound(k) for k, e in errors.items())))
          progress(records[-1])
  return records


# ------------------------------------------------------------------------ (b) train steps
def row_arg(name: str, tiny: bool) -> str:
  """'tiny', or the paper row: the default argument of configs/<name>.py's get_config."""
  if tiny:
    return 'tiny'
  return inspect.signature(_config_module(name).get_config).parameters['arg'].default


def _config_module(name: str):
  from mimjax import cli
  if cli.REPO not in sys.path:  # config files import `configs.common` (as cli.prepare_argv)
    sys.path.insert(0, cli.REPO)
  return importlib.import_module(f'configs.{name}')


def row_config(name: str, options: SuiteOptions):
  """configs/<name>.py's row for the bench: synthetic data, the suite's batch and attention."""
  import jax
  config = _config_module(name).get_config(row_arg(name, options.tiny))
  config.data.name = 'synthetic'  # what bench_step times on; also what a tokenizer fits on
  config.data.worker_count = 0    # as bench_step's loader: no worker processes for it
  if options.batch_per_device:
    config.batch_size = options.batch_per_device * jax.device_count()
  if options.attention:
    config.model.attention = options.attention
  tok = config.get('tokenizer')
  if config.get('target') == 'tokens' and not (tok.codebook or tok.fit_on_start):
    # A paper row's token target (BEiT): a k-means codebook of the row's vocabulary fitted at
    # start on 64 synthetic images, one iteration (64 × 196 patches ≥ 8192 centres); its
    # values do not change the step's cost.
    tok.update({'fit_on_start': True, 'fit_images': 64, 'fit_iters': 1})
  return config


def add_random_teacher(config, options: SuiteOptions, workdir: str) -> None:
  """A KD row's teacher: its method's MRE row (configs/mre_<method>.py, same size), freshly
  initialised and saved under `workdir` (the step's cost does not depend on its weights)."""
  import jax
  from mimjax import checkpoint
  from mimjax.data import pipeline
  from mimjax.objectives import base as objectives
  teacher = row_config(f'mre_{config.distill.method}', options)
  example = pipeline.blank_example(teacher.data, segments=True)
  objective = objectives.load(teacher.objective).make(teacher)
  params = jax.jit(objective.init)(jax.random.key(0), example)[0]  # one program, not per op
  checkpoint.save_params(os.path.join(workdir, 'teacher'), teacher, params)
  config.teacher = os.path.join(workdir, 'teacher')


CONFIG_KEYS = ('objective', 'variant', 'image_size', 'dtype', 'attention', 'attention_backend',
               'batch_size', 'device_augment')


def step_record(name: str, options: SuiteOptions, torch_result: Optional[dict]) -> dict:
  """One train-step record: bench.bench_step's figures (+ the PyTorch MAE side by side)."""
  import jax
  from mimjax import bench
  from mimjax.validate import validate_config
  row = f'configs/{name}.py:{row_arg(name, options.tiny)}'
  record = {'kind': 'step', 'name': name, 'config': {'row': row},
            'devices': jax.device_count(), 'device_kind': jax.devices()[0].device_kind}
  try:
    with tempfile.TemporaryDirectory(prefix=f'bench_suite_{name}_') as workdir:
      config = row_config(name, options)
      if 'teacher' in config:
        add_random_teacher(config, options, workdir)
      validate_config(config)
      result = bench.bench_step(config, options.steps, options.warmup, options.peak_tflops)
  except Exception as e:  # pylint: disable=broad-except  (recorded, the suite goes on)
    return dict(record, shapes={}, numbers={}, ok=False, error=one_line(e))
  if torch_result is not None:
    result = bench.with_torch(result, torch_result, jax_devices=result['devices'])
    if 'error' in torch_result:
      record['error'] = f'PyTorch reference: {torch_result["error"]}'
  record['config'].update({k: result.pop(k) for k in CONFIG_KEYS})
  for k in ('devices', 'device_kind'):
    result.pop(k)
  numbers = result
  ok = (math.isfinite(numbers['step_ms']) and numbers['step_ms'] > 0
        and math.isfinite(numbers['final_loss']) and 'error' not in record)
  return dict(record, shapes={'batch_size': record['config']['batch_size'],
                              'image_size': record['config']['image_size']},
              numbers=numbers, ok=ok)


def torch_references(options: SuiteOptions) -> dict:
  """{row: PyTorch MAE step result} for the rows that have one (objective 'mae', no MRE
  bias), run before any JAX work so JAX's GPU memory is not yet taken; with torch or timm
  missing, {row: {'error': why}} (the step record still passes)."""
  names = [n for n in options.rows if options.torch and _has_torch_reference(
      row_config(n, options))]
  if not names:
    return {}
  try:
    from mimjax import bench_torch
    import torch
  except ImportError as e:
    return {n: {'skipped': f'no PyTorch reference: {e} (pip install -e ".[bench]")'}
            for n in names}
  import jax
  out = {}
  for name in names:
    config = row_config(name, options)
    # PyTorch runs on one device: the per-device batch, compared per device (with_torch).
    config.batch_size = max(config.batch_size // jax.device_count(), 1)
    try:
      out[name] = bench_torch.bench_torch(config, options.steps, options.warmup,
                                          options.torch, threads=options.torch_threads)
    except Exception as e:  # pylint: disable=broad-except  (recorded on the row)
      out[name] = {'error': one_line(e)}
    if torch.cuda.is_available():
      torch.cuda.empty_cache()
  return out


def _has_torch_reference(config) -> bool:
  """bench_torch's MAE: plain MAE rows only (no MRE bias, no KD teacher)."""
  from mimjax import bench
  return config.objective == 'mae' and not bench.needs_segments(config)


def one_line(e: BaseException) -> str:
  """An exception as one line: its type and the first line of its message."""
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'.rstrip(': ')


# ------------------------------------------------------------------------ the whole suite
def run(options: SuiteOptions, progress: Callable[[dict], None] = lambda record: None) -> dict:
  """Both parts; {'suite': what ran where, 'records': [...]}; `progress` sees each record."""
  import jax
  wall, cpu = time.perf_counter(), time.process_time()
  torch_results = torch_references(options)
  records = attention_checks(options, progress)
  for name in options.rows:
    records.append(step_record(name, options, torch_results.get(name)))
    progress(records[-1])
  return {'suite': {'version': 1, 'platform': jax.default_backend(),
                    'device_kind': jax.devices()[0].device_kind,
                    'devices': jax.device_count(), 'jax': jax.__version__,
                    'options': dataclasses.asdict(options),
                    'wall_s': round(time.perf_counter() - wall, 1),
                    'cpu_s': round(time.process_time() - cpu, 1),
                    'ok': all(r['ok'] for r in records)},
          'records': records}


def _fmt(value, spec: str = '') -> str:
  return '-' if value is None else format(value, spec)


def table(report: dict) -> str:
  """The report as two fixed-width tables (kernels, steps) and a verdict line."""
  kernels = [r for r in report['records'] if r['kind'] == 'kernel']
  steps = [r for r in report['records'] if r['kind'] == 'step']
  lines = []
  if kernels:
    lines.append(f'{"kernel check (vs xla)":<34} {"max err":>9} {"tol":>9} {"fwd+bwd ms":>10} '
                 f'{"cpu ms":>9} {"xla ms":>9} {"xla cpu":>9}  ok')
    for r in kernels:
      n = r['numbers']
      ms = lambda key, field: n[key][field] if key in n else None
      lines.append(f'{r["name"]:<34} {_fmt(n.get("max_err"), ".2e"):>9} '
                   f'{_fmt(n.get("tolerance"), ".1e"):>9} {_fmt(ms("fwd_bwd", "ms"), ".2f"):>10} '
                   f'{_fmt(ms("fwd_bwd", "cpu_ms"), ".2f"):>9} '
                   f'{_fmt(ms("reference_fwd_bwd", "ms"), ".2f"):>9} '
                   f'{_fmt(ms("reference_fwd_bwd", "cpu_ms"), ".2f"):>9}  {_verdict(r)}')
  if steps:
    lines.append('')
    lines.append(f'{"train step":<34} {"batch":>5} {"compile s":>9} '
                 f'{"step ms":>9} {"cpu ms":>9} {"img/s":>9} {"GFLOP/img":>9} {"MFU":>6} '
                 f'{"torch img/s":>11} {"jax/torch":>9}  ok')
    for r in steps:
      n, c = r['numbers'], r['config']
      t = n.get('torch') or {}
      lines.append(f'{c["row"].removeprefix("configs/"):<34} {_fmt(c.get("batch_size")):>5} '
                   f'{_fmt(n.get("compile_s"), ".1f"):>9} {_fmt(n.get("step_ms"), ".1f"):>9} '
                   f'{_fmt(n.get("step_cpu_ms"), ".1f"):>9} {_fmt(n.get("img_per_s"), ".1f"):>9} '
                   f'{_fmt(n.get("gflops_per_img"), ".3f"):>9} {_fmt(n.get("mfu"), ".3f"):>6} '
                   f'{_fmt(t.get("img_per_s"), ".1f"):>11} '
                   f'{_fmt(n.get("jax_over_torch"), ".2f"):>9}  {_verdict(r)}')
  s = report['suite']
  lines.append('')
  lines.append(f'{sum(r["ok"] for r in report["records"])}/{len(report["records"])} ok on '
               f'{s["devices"]} × {s["device_kind"]} ({s["platform"]}), {s["wall_s"]} s wall, '
               f'{s["cpu_s"]} s CPU')
  return '\n'.join(lines)


def _verdict(record: dict) -> str:
  return 'ok' if record['ok'] else 'FAIL' + (f': {record["error"]}' if 'error' in record else '')


def write_json(report: dict, path: str) -> None:
  """Writes the report whole or not at all (a temp file renamed into place)."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix='.bench_suite_', suffix='.json', dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(report, f, indent=2)
    os.replace(tmp, path)
  except BaseException:
    os.remove(tmp)
    raise


def main(options: SuiteOptions, out: str) -> int:
  """Runs the suite, prints the table, writes `out`; the exit status (1: a record failed)."""
  report = run(options, lambda r: print(f'{r["kind"]} {r["name"]}: {_verdict(r)}', flush=True))
  print()
  print(table(report))
  write_json(report, out)
  print(f'wrote {out}')
  return 0 if report['suite']['ok'] else 1
