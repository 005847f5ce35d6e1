"""Reading a compiled program: per-device FLOPs and the shapes its all-gathers produce; meshes
of fake CPU devices and of a TPU topology's compile-only chips."""

import functools
import importlib.util
import math
import re

import jax
import ml_collections
import pytest

from mimjax import sharding

_SHAPE = re.compile(r'[a-z]+[0-9]*\[([0-9,]*)\]')


def mesh_of(devices: int) -> jax.sharding.Mesh:
  """A data-parallel mesh over the first `devices` (fake CPU) devices."""
  return sharding.make_mesh(ml_collections.ConfigDict({'devices': devices}))


def flops(compiled) -> float:
  """Per-device FLOPs of a compiled SPMD program (XLA cost analysis)."""
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


def all_gather_sizes(compiled) -> list[int]:
  """Element counts of every array an all-gather in the compiled HLO produces."""
  sizes = []
  for line in compiled.as_text().splitlines():
    if re.search(r'\ball-gather(-start)?\(', line):
      result = line.split('=', 1)[1].split('all-gather', 1)[0]
      sizes += [math.prod(int(d) for d in m.split(',') if d) for m in _SHAPE.findall(result)]
  return sizes


def abstract(shape, dtype, mesh, spec=jax.sharding.PartitionSpec()) -> jax.ShapeDtypeStruct:
  """An input with no data, placed on `mesh` with `spec`."""
  return jax.ShapeDtypeStruct(shape, dtype,
                              sharding=jax.sharding.NamedSharding(mesh, spec))


# The TPU compiler comes with libtpu ([dev] extra); without it the TPU-compile tests skip.
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason='libtpu (the [dev] extra) is not installed')
TPU_TOPOLOGY = 'v5e:2x2'  # the smallest multi-chip slice; a 1-chip mesh takes its first chip


@functools.cache
def _tpu_devices() -> tuple:
  from jax.experimental import topologies
  return tuple(topologies.get_topology_desc(topology_name=TPU_TOPOLOGY,
                                            platform='tpu').devices)


def tpu_mesh(chips: int) -> jax.sharding.Mesh:
  """A data-parallel mesh over the first `chips` of a v5e 2x2 slice, compile-only (XLA:TPU
  compiles for it on this host, nothing runs)."""
  return sharding.make_mesh(ml_collections.ConfigDict({'devices': chips}), _tpu_devices())
