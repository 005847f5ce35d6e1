"""Offline check of the MRE flash-attention kernels: GPU registers, spills, shared memory;
TPU compile status, cost and grid.

Needs neither a GPU nor a TPU. GPU (default): each kernel (forward, dQ, dK/dV, with the MRE
bias and its gradient) is lowered for CUDA on this host (`lowering_platforms=('cuda',)`), the
Triton IR that Pallas puts in the custom call is compiled by the Triton in the environment
(torch installs one) for each target, and `ptxas -v` reports registers and spills; Triton's
own metadata gives the shared memory a block needs. The command prints one table and exits 1
if any kernel spills, needs more shared memory than one block may have, or fails to lower:

  python -m mimjax.kernels_check
  python -m mimjax.kernels_check --arch sm_90a --seq 197 --head-dim 64

TPU (`--tpu CHIP...`): the same forward + backward is compiled by XLA:TPU and Mosaic from
libtpu for one compile-only chip of a TPU topology; the table gives, per shape, whether it
compiles, XLA's cost analysis (FLOPs, bytes accessed; the kernels count through their
`pl.CostEstimate`), the temporaries of its memory analysis, and each kernel's grid and matmul
FLOPs per grid step. Exit status 1 if a shape does not compile:

  python -m mimjax.kernels_check --tpu v5e v4

Every default GPU shape: about two minutes on two cores with a cold Triton cache, ~35 s once
~/.triton holds the kernels (each distinct Triton IR and target is compiled once); every TPU
shape on both chips: ~40 s. Run times need a device and are not measured here.
"""

import argparse
import dataclasses
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from mimjax.models import pallas_attention
from mimjax.models.segment_bias import SegmentTerms

# Target → (compute capability, largest shared memory one block may use, in bytes). A100: 164 KB
# per SM of which 163 KB can go to one block; H100: 227 KB per block (CUDA programming guide,
# "Compute capabilities" table).
ARCHS = {'sm_80': (80, 163 * 1024), 'sm_90a': (90, 227 * 1024)}
SEQ_LENS = (50, 197, 785)       # DINO local crop + cls, ViT-B/16 at 224, ViT-B/8 / ViT-L/16 at 448
HEAD_DIMS = (64, 80)            # ViT-S/B/L; ViT-H/14
BATCH, HEADS = 2, 12            # grid sizes only: they do not change a kernel's code
# TPU chip → a topology of it that libtpu knows (the check compiles for its first chip).
TPU_TOPOLOGIES = {'v4': 'v4:2x2x1', 'v5e': 'v5e:2x2', 'v5p': 'v5p:2x2x1', 'v6e': 'v6e:2x2'}


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One Triton kernel of the attention: its name, launch parameters and Triton IR (text)."""
  name: str
  num_warps: int
  num_stages: int
  ir: str


@dataclasses.dataclass(frozen=True)
class Row:
  """What ptxas and Triton report for one kernel at one shape and target."""
  arch: str
  seq: int
  head_dim: int
  kernel: str
  num_warps: int
  num_stages: int
  registers: int
  spill_stores: int
  spill_loads: int
  shared: int
  error: str = ''

  def ok(self) -> bool:
    """No error, no spill, shared memory within the target's per-block limit."""
    return (not self.error and self.spill_stores == 0 and self.spill_loads == 0
            and self.shared <= ARCHS[self.arch][1])


def _attention_grad(seq: int, head_dim: int, backend: str, dtype=jnp.bfloat16, sharding=None):
  """(jitted gradient of one attention call with the MRE bias in q, k, v, u_pos, u_neg, its
  abstract arguments): the kernels' forward, dQ (+ d u) and dK/dV."""
  def loss(q, k, v, ids, u_pos, u_neg):
    out = pallas_attention.flash_attention(q, k, v, scale=head_dim ** -0.5,
                                           segments=SegmentTerms(ids, u_pos, u_neg),
                                           backend=backend)
    return jnp.sum(out.astype(jnp.float32))

  qkv = jax.ShapeDtypeStruct((BATCH, seq, HEADS, head_dim), dtype, sharding=sharding)
  u = jax.ShapeDtypeStruct((HEADS,), jnp.float32, sharding=sharding)
  ids = jax.ShapeDtypeStruct((BATCH, seq), jnp.int32, sharding=sharding)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4, 5))), (qkv, qkv, qkv, ids, u, u)


def triton_kernels(seq: int, head_dim: int, dtype=jnp.bfloat16) -> List[Kernel]:
  """The Triton kernels of one attention call with the MRE bias and its gradient (forward,
  dQ, dK/dV), lowered for CUDA on any host."""
  grad, args = _attention_grad(seq, head_dim, 'gpu', dtype)
  lowered = grad.trace(*args).lower(lowering_platforms=('cuda',))
  return [_kernel(op) for op in _custom_calls(lowered.compiler_ir('stablehlo').operation)]


def _custom_calls(op) -> list:
  """The Triton custom calls in a StableHLO module, in program order."""
  found = []
  for region in op.regions:
    for block in region.blocks:
      for inner in block.operations:
        attrs = inner.operation.attributes
        if (inner.operation.name == 'stablehlo.custom_call'
            and 'triton' in str(attrs['call_target_name'])):
          found.append(inner.operation)
        found += _custom_calls(inner.operation)
  return found


def _kernel(op) -> Kernel:
  """Decodes the backend config of one `__gpu$xla.gpu.triton` call (jaxlib ≤ 0.10.2: the
  Triton module as MLIR bytecode) into a Kernel with the module as text."""
  from jax._src.interpreters import mlir
  from jax._src.lib.mlir import ir
  from jax._src.lib.triton import dialect as tt_dialect
  config = ir.DictAttr(op.attributes['mhlo.backend_config'])
  value = lambda key: ir.IntegerAttr(config[key]).value
  with mlir.make_ir_context() as context:
    tt_dialect.register_dialect(context)
    module = ir.Module.parse(ir.StringAttr(config['ir']).value_bytes)
    text = module.operation.get_asm(enable_debug_info=False)
  return Kernel(ir.StringAttr(config['name']).value, value('num_warps'), value('num_stages'),
                text)


def ptxas_path() -> str:
  """The ptxas that Triton ships (its own CUDA release), else the first on PATH."""
  import triton
  shipped = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')
  found = shipped if os.path.exists(shipped) else shutil.which('ptxas')
  if found is None:
    raise FileNotFoundError('kernels_check: no ptxas (neither triton/backends/nvidia/bin/ptxas '
                            'nor one on PATH); install triton (pip install triton)')
  return found


def compile_kernel(kernel: Kernel, arch: str, workdir: str) -> Tuple[int, int, int, int]:
  """(registers, spill store bytes, spill load bytes, shared memory bytes) of one kernel
  compiled by Triton for `arch`."""
  import triton
  from triton.backends.compiler import GPUTarget
  path = os.path.join(workdir, f'{kernel.name}.ttir')
  with open(path, 'w') as f:
    f.write(kernel.ir)
  compiled = triton.compile(path, target=GPUTarget('cuda', ARCHS[arch][0], 32),
                            options=dict(num_warps=kernel.num_warps,
                                         num_stages=kernel.num_stages))
  ptx = os.path.join(workdir, f'{kernel.name}.{arch}.ptx')
  with open(ptx, 'w') as f:
    f.write(compiled.asm['ptx'])
  report = subprocess.run([ptxas_path(), '-v', f'--gpu-name={arch}', ptx, '-o', os.devnull],
                          capture_output=True, text=True, check=True).stderr
  number = lambda pattern: int(re.search(pattern, report).group(1))
  return (number(r'Used (\d+) registers'), number(r'(\d+) bytes spill stores'),
          number(r'(\d+) bytes spill loads'), compiled.metadata.shared)


def check(archs: Sequence[str] = tuple(ARCHS), seqs: Sequence[int] = SEQ_LENS,
          head_dims: Sequence[int] = HEAD_DIMS) -> List[Row]:
  """One Row per (shape, kernel, target); a shape that fails to lower gives one error row."""
  rows, done = [], {}  # done: (IR, warps, stages, arch) → numbers (shapes often share tiles)
  with tempfile.TemporaryDirectory() as workdir:
    for d in head_dims:
      for t in seqs:
        try:
          kernels = triton_kernels(t, d)
        except Exception as e:  # noqa: BLE001 — a kernel that cannot lower is a finding
          rows += [Row(a, t, d, 'all', 0, 0, 0, 0, 0, 0, f'{type(e).__name__}: {e}'[:200])
                   for a in archs]
          continue
        for arch in archs:
          for k in kernels:
            key = (k.ir, k.num_warps, k.num_stages, arch)
            if key not in done:
              done[key] = compile_kernel(k, arch, workdir)
            rows.append(Row(arch, t, d, k.name, k.num_warps, k.num_stages, *done[key]))
  return rows


def table(rows: Sequence[Row]) -> str:
  """The rows as a fixed-width table."""
  head = (f'{"target":7} {"T":>4} {"D":>3}  {"kernel":14} {"warps":>5} {"stages":>6} '
          f'{"regs":>4} {"spill st/ld (B)":>15} {"shared (B)":>10} {"limit":>7}  ok')
  lines = [head]
  for r in rows:
    if r.error:
      lines.append(f'{r.arch:7} {r.seq:4} {r.head_dim:3}  does not lower: {r.error}')
      continue
    lines.append(f'{r.arch:7} {r.seq:4} {r.head_dim:3}  {r.kernel:14} {r.num_warps:5} '
                 f'{r.num_stages:6} {r.registers:4} {r.spill_stores:>7}/{r.spill_loads:<7} '
                 f'{r.shared:10} {ARCHS[r.arch][1]:7}  {"yes" if r.ok() else "NO"}')
  return '\n'.join(lines)


@dataclasses.dataclass(frozen=True)
class TpuKernel:
  """One Pallas kernel as traced for TPU: its grid and matmul FLOPs (its cost estimate)."""
  name: str
  grid: Tuple[int, ...]
  flops: float

  def step_flops(self) -> float:
    """Work of one grid step (each step also pays a fixed cost on a TPU)."""
    return self.flops / math.prod(self.grid)


@dataclasses.dataclass(frozen=True)
class TpuRow:
  """What XLA:TPU reports for one shape compiled for one chip."""
  chip: str
  seq: int
  head_dim: int
  kernels: Tuple[TpuKernel, ...] = ()
  flops: float = 0.0           # the whole program's, kernels included (cost analysis)
  bytes_accessed: float = 0.0
  temp_bytes: int = 0          # memory analysis: temporaries
  error: str = ''

  def ok(self) -> bool:
    """Compiled."""
    return not self.error


def _pallas_kernels(jaxpr) -> List[TpuKernel]:
  """The pallas_calls in a (closed) jaxpr and the jaxprs inside it, in program order."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'pallas_call':
      cost = eqn.params.get('cost_estimate')
      found.append(TpuKernel(str(eqn.params['name']),
                             tuple(eqn.params['grid_mapping'].grid),
                             float(cost.flops) if cost is not None else float('nan')))
      continue
    for sub in jax_core.jaxprs_in_params(eqn.params):
      found += _pallas_kernels(sub)
  return found


def tpu_check(chips: Sequence[str] = ('v5e', 'v4'), seqs: Sequence[int] = SEQ_LENS,
              head_dims: Sequence[int] = HEAD_DIMS) -> List[TpuRow]:
  """One TpuRow per (chip, shape): the attention's forward + backward (bf16, MRE bias)
  compiled for the first chip of `TPU_TOPOLOGIES[chip]`; a shape that fails gives an error
  row."""
  from jax.experimental import topologies
  rows = []
  for chip in chips:
    device = topologies.get_topology_desc(topology_name=TPU_TOPOLOGIES[chip],
                                          platform='tpu').devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    for d in head_dims:
      for t in seqs:
        try:
          grad, args = _attention_grad(t, d, 'tpu', sharding=sharding)
          traced = grad.trace(*args)
          kernels = tuple(_pallas_kernels(traced.jaxpr.jaxpr))
          compiled = traced.lower().compile()
        except Exception as e:  # noqa: BLE001 — a shape that cannot compile is a finding
          rows.append(TpuRow(chip, t, d, error=f'{type(e).__name__}: {e}'.splitlines()[0][:300]))
          continue
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        rows.append(TpuRow(chip, t, d, kernels, float(cost.get('flops', 0.0)),
                           float(cost.get('bytes accessed', 0.0)),
                           compiled.memory_analysis().temp_size_in_bytes))
  return rows


def tpu_table(rows: Sequence[TpuRow]) -> str:
  """The TPU rows as a fixed-width table; kernels as name grid=... MFLOP/step."""
  lines = [f'{"chip":4} {"T":>4} {"D":>3}  {"GFLOP":>7} {"MB accessed":>11} {"temp MB":>7}  '
           'kernels: grid, matmul MFLOP per grid step   compiles']
  for r in rows:
    if r.error:
      lines.append(f'{r.chip:4} {r.seq:4} {r.head_dim:3}  does not compile: {r.error}   NO')
      continue
    kernels = '; '.join(f'{k.name.removeprefix("mre_flash_")} {"x".join(map(str, k.grid))}, '
                        f'{k.step_flops() / 1e6:.1f}' for k in r.kernels)
    lines.append(f'{r.chip:4} {r.seq:4} {r.head_dim:3}  {r.flops / 1e9:7.2f} '
                 f'{r.bytes_accessed / 1e6:11.1f} {r.temp_bytes / 1e6:7.1f}  {kernels}   yes')
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI: print the table; exit status 1 if any kernel spills, overflows or fails to lower
  (GPU), or any shape fails to compile (TPU)."""
  parser = argparse.ArgumentParser(prog='python -m mimjax.kernels_check', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--arch', nargs='+', choices=tuple(ARCHS), default=list(ARCHS))
  parser.add_argument('--tpu', nargs='+', choices=tuple(TPU_TOPOLOGIES), metavar='CHIP',
                      help=f'compile for these TPU chips ({", ".join(TPU_TOPOLOGIES)}) with '
                      'libtpu instead of the GPU check')
  parser.add_argument('--seq', nargs='+', type=int, default=list(SEQ_LENS))
  parser.add_argument('--head-dim', nargs='+', type=int, default=list(HEAD_DIMS))
  args = parser.parse_args(argv)
  if min(args.seq + args.head_dim) < 1:
    parser.error('--seq and --head-dim take positive integers')
  if args.tpu:
    if importlib.util.find_spec('libtpu') is None:
      parser.error('--tpu needs libtpu, the TPU compiler: pip install -e ".[dev]"')
    rows = tpu_check(args.tpu, args.seq, args.head_dim)
    print(tpu_table(rows))
    bad = [r for r in rows if not r.ok()]
    if bad:
      print(f'kernels_check: {len(bad)} of {len(rows)} shapes do not compile for TPU',
            file=sys.stderr)
    return 1 if bad else 0
  rows = check(args.arch, args.seq, args.head_dim)
  print(table(rows))
  bad = [r for r in rows if not r.ok()]
  if bad:
    print(f'kernels_check: {len(bad)} of {len(rows)} kernels spill, exceed the shared memory '
          'limit or do not lower', file=sys.stderr)
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main())
