"""Device mesh ('data', 'fsdp'), parameter and batch shardings, host → global arrays."""

import functools
import math
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')  # FSDP shards the batch too; params only over 'fsdp'.


def make_mesh(config: ml_collections.ConfigDict, devices: Optional[list] = None) -> Mesh:
  """Mesh (data, fsdp) over the first `config.devices` of `devices` (default jax.devices(),
  -1: all); `data=-1` fills the rest. `devices` may be compile-only (a TPU topology's)."""
  devices = jax.devices() if devices is None else list(devices)
  if config.get('devices', -1) not in (-1, None):
    if not 0 < config.devices <= len(devices):
      raise ValueError(f'config.mesh.devices={config.devices}: have {len(devices)} devices')
    devices = devices[:config.devices]
  n = len(devices)
  fsdp = int(config.get('fsdp', 1))
  data = int(config.get('data', -1))
  if data == -1:
    if fsdp <= 0 or n % fsdp:
      raise ValueError(f'config.mesh.fsdp={fsdp} must divide the device count {n}')
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f'config.mesh data×fsdp = {data}×{fsdp} != device count {n}')
  return jax.make_mesh((data, fsdp), ('data', 'fsdp'), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def default_mesh() -> Mesh:
  """A data-parallel mesh over every device (what `make_mesh` gives an empty config)."""
  return make_mesh(ml_collections.ConfigDict({}))


def traced_on(mesh: Mesh, fn: Callable) -> Callable:
  """`fn`, traced under `mesh` (its abstract mesh): the model's kernels then compile for that
  mesh's devices and split over its batch axes (mimjax.models.pallas_attention.platform and
  per_device), also when the devices are a TPU topology compiled for on a CPU host."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def jit_on(mesh: Mesh, fn: Callable, **jit_kwargs) -> Callable:
  """`jax.jit` of `fn` traced under `mesh` (`traced_on`): what every step, evaluator and feature
  extractor compiles, so that a Pallas kernel in it partitions over the mesh's devices."""
  return jax.jit(traced_on(mesh, fn), **jit_kwargs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def abstract_batch(example: dict, global_batch: int, mesh: Mesh) -> dict:
  """A batch of one → ShapeDtypeStructs of the global batch, split like the trainer's batch."""
  spec = batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((global_batch,) + np.shape(v)[1:], np.asarray(v).dtype,
                                  sharding=spec) for k, v in example.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple, fsdp: int, min_size: int) -> P:
  """Shards the largest dim divisible by `fsdp`; small tensors stay replicated."""
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, tree: Any, min_size: int = 2 ** 16) -> Any:
  """NamedSharding per leaf: FSDP over 'fsdp' when that axis is > 1, else replicated."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(
      lambda x: NamedSharding(mesh, _fsdp_spec(tuple(x.shape), fsdp, min_size)), tree)


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch → global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  n = math.prod(mesh.shape.values())
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    global_batch = value.shape[0] * jax.process_count()
    if global_batch % n:
      raise ValueError(f'global batch {global_batch} (key {key!r}) is not divisible by the '
                       f'{n} devices of the mesh')
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def pad_rows(x: np.ndarray, multiple: int, fill=0) -> np.ndarray:
  """x with `fill` rows appended up to a multiple of `multiple` rows."""
  pad = -len(x) % multiple
  if not pad:
    return x
  return np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)])


def row_chunk(n: int, mesh: Mesh, chunk: int) -> int:
  """Rows per block when n rows are split over the mesh in blocks of at most `chunk` rows:
  each device's ⌈n / devices⌉ rows in equal blocks (so padding stays under one row a block)."""
  per_device = max(1, -(-n // mesh.size))
  blocks = -(-per_device // max(1, int(chunk)))
  return -(-per_device // blocks)


def shard_rows(x: np.ndarray, mesh: Mesh, chunk: int, fill=0) -> jax.Array:
  """Host rows (n, ...) → a (blocks, chunk, ...) jax.Array whose blocks are split over every
  device (padded with `fill` to a multiple of devices × chunk): evaluators and the k-means fit
  keep a data set on the devices this way and walk each shard block by block."""
  x = pad_rows(np.asarray(x), mesh.size * chunk, fill)
  return jax.device_put(x.reshape((-1, chunk) + x.shape[1:]), batch_sharding(mesh))
