"""Flash attention in Pallas that forms the MRE segment bias inside the kernel.

`flash_attention(q, k, v, scale=..., segments=SegmentTerms(ids, u_pos, u_neg))` computes
softmax((q·kᵀ + b)·scale)·v with b_ij = u_pos[h] if ids_i = ids_j ≠ 0, u_neg[h] if
ids_i ≠ ids_j (both ≠ 0), 0 otherwise (SAM-helps-SSL Eq. 5, as `Attention` adds it), without
ever holding a T×T array in memory: each program takes one query tile, streams the key/value
tiles with an online softmax (FlashAttention-2) and builds the bias of the (block_q, block_k)
tile from the two tiles' ids and the head's two scalars. Without `segments` the same kernels
run without the bias (plain flash attention). The layout follows the compiler: on GPU the grid
is (batch, head, tile) over (B, H, T_pad, D) copies; on TPU it is (batch, tile) over q, k, v
reshaped to (B, T, H·D), every head in each program, 128-token tiles, nothing padded (blocks
run past the array's end and the kernels zero or drop those rows).

Backward (custom VJP): P is recomputed from the saved log-sum-exp, never stored. One kernel
per key tile accumulates dK, dV over the query tiles; one per query tile accumulates dQ and the
row sums of dS over same-segment and different-segment pairs, which (× scale, summed over
batch and rows) are d u_pos and d u_neg. Sequences are padded to the tile size (GPU: in
memory; TPU: only the tiles); padded keys are masked in-kernel and padded query rows are
dropped. Details: docs/performance.md.

The kernels follow the devices they are compiled for: the platform of the mesh the caller
traces under (`jax.sharding.use_abstract_mesh`, as the trainer's step does), else jax's default
backend. On CPU they run in Pallas interpret mode (what the tests check); on GPU they lower
through Triton and on TPU through Mosaic — compiled for TPU by XLA:TPU on a CPU host
(`mimjax.plan --target`), never run on hardware here (see the docs). Neither Mosaic nor Triton
calls can be partitioned by XLA, so under a mesh the kernels run inside `shard_map`: each
device on its own rows of the batch (mesh axes 'data', 'fsdp'), heads and sequence local.
"""

import dataclasses
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from mimjax.models.segment_bias import SegmentTerms

# Finite "−∞" for padded keys: exp() of it is 0 without inf − inf = NaN in the online softmax.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NT = (((1,), (1,)), ((), ()))  # dot_general dimension numbers for a · bᵀ
TN = (((0,), (0,)), ((), ()))  # and for aᵀ · b
MAX_BLOCK = 128
TPU_BLOCK = 128  # TPU tile: the MXU's width and the lane count of a vector register
# VMEM the whole-sequence blocks of a TPU kernel may take: 3/4 of a v4 core's 16 MiB (the
# smallest of v4, v5e, v5p, v6e), the rest for the tiles and the compiler's own buffers.
TPU_WHOLE_SEQUENCE_VMEM = 12 * 2 ** 20
# The mesh axes the batch is split over: mimjax.sharding.BATCH_AXES (models sit below sharding
# in the layers; tests/models/test_pallas_attention.py checks the two agree).
BATCH_AXES = ('data', 'fsdp')


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the devices of the mesh being traced under (set by
  `jax.sharding.use_abstract_mesh`/`jax.set_mesh`), else jax's default backend. A TPU mesh of
  compile-only devices on a CPU host thus gets TPU kernels."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  return device.platform if device is not None else jax.default_backend()


def block_size(n: int, most: int = MAX_BLOCK) -> int:
  """Tile length for n tokens: the next power of two ≥ 16 up to `most` (one tile), else `most`.

  Powers of two ≥ 16 suit Triton's tl.dot; a tile that is either 128 or the whole padded
  sequence satisfies Mosaic's (8, 128) block rule for the (1, block_k) key-id tiles.
  """
  return min(most, max(16, pl.next_power_of_2(n)))


@dataclasses.dataclass(frozen=True)
class Tiles:
  """One kernel's tile (block_q query rows × block_k keys) and its Triton launch parameters
  (ignored by Mosaic and interpret mode)."""
  block_q: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for n in (self.block_q, self.block_k):
      if n < 16 or n & (n - 1):
        raise ValueError(f'pallas attention: tile sizes must be powers of two ≥ 16, got {self}')


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the forward, dQ and dK/dV kernels (jax's Pallas GPU attention `BlockSizes` is the
  model): the backward kernels hold more live tiles (P, dP, dS and two accumulators) than the
  forward, so on GPU they get smaller tiles to stay within the 255 registers of a thread."""
  fwd: Tiles
  dq: Tiles
  dkv: Tiles

  @classmethod
  def uniform(cls, block_q: int, block_k: int) -> 'BlockSizes':
    """The same tile for all three kernels (TPU, interpret mode, or as asked)."""
    return cls(*[Tiles(block_q, block_k)] * 3)

  def padded(self, t: int, s: int) -> Tuple[int, int]:
    """Query and key lengths padded to a multiple of every kernel's tile (powers of two, so a
    multiple of the largest is a multiple of all)."""
    round_up = lambda n, tiles: pl.cdiv(n, max(tiles)) * max(tiles)
    kernels = (self.fwd, self.dq, self.dkv)
    return (round_up(t, [k.block_q for k in kernels]), round_up(s, [k.block_k for k in kernels]))


def default_blocks(t: int, s: int, head_dim: int, backend: str) -> BlockSizes:
  """Tiles for t queries over s keys of `head_dim` (padded on GPU) on `backend`.

  GPU: tuned with `python -m mimjax.kernels_check` (sm_80 and sm_90a, bf16, T = 50, 197, 785,
  D = 64 and 80 → 128) so that no kernel spills registers — table in docs/performance.md.
  TPU: 128×128 compute tiles for all three kernels, every head in a program, the whole padded
  key sequence in VMEM (as jax's TPU flash attention: block_k_major = the sequence, block_k =
  128); short sequences (T = 37, 50) pad to 128, never below (the MXU is 128 wide).
  Interpret mode (CPU): one tile per axis up to 128 for all three kernels.
  """
  if backend == 'tpu':
    return BlockSizes.uniform(TPU_BLOCK, TPU_BLOCK)
  if backend != 'gpu':
    return BlockSizes.uniform(block_size(t), block_size(s))
  # A thread has 255 registers for its share of the float32 accumulators ((block, D) each:
  # one in the forward and dQ kernels, two in dK/dV) and of the (block_q, block_k) logits,
  # P, dP and dS tiles. 128×128 tiles spilled ~1 KB per thread in every kernel; these are the
  # largest tiles measured to leave a margin below 255 on both targets (docs/performance.md).
  wide = head_dim > 64
  tile = lambda bq, bk, warps: Tiles(block_size(t, bq), block_size(s, bk), warps, 2)
  fwd = tile(64, 64, 8 if wide else 4)
  dq = tile(32, 32, 4) if wide else tile(64, 32, 4)
  dkv = tile(32, 32, 4)
  return BlockSizes(fwd, dq, dkv)


def check_tpu_blocks(blocks: BlockSizes) -> None:
  """Raises ValueError unless every tile is a multiple of 128 (Mosaic: key ids are (1, block_k)
  lane rows; smaller tiles would leave the 128-wide MXU idle)."""
  for tiles in (blocks.fwd, blocks.dq, blocks.dkv):
    if tiles.block_q % TPU_BLOCK or tiles.block_k % TPU_BLOCK:
      raise ValueError(f'pallas attention: TPU tiles must be multiples of {TPU_BLOCK}, got {tiles}')


def kernel_head_dim(d: int, backend: str) -> int:
  """Head dim the kernels see: on GPU (and in interpret mode, which runs the GPU kernels) the
  next power of two ≥ 16, since Triton tiles are powers of two (ViT-H/14's D = 80 → 128);
  on TPU D itself (the heads share a block's lane axis, H·D wide, sliced per head)."""
  return d if backend == 'tpu' else max(16, pl.next_power_of_2(d))


@dataclasses.dataclass(frozen=True)
class _Static:
  """Compile-time constants of one kernel call (hashable: a nondiff argument of custom_vjp)."""
  scale: float
  q_len: int       # real query count; rows ≥ q_len of the last query tile are padding
  kv_len: int      # real key count; keys at positions ≥ kv_len are padding
  heads: int
  head_dim: int    # as the kernels see it (`kernel_head_dim`)
  blocks: BlockSizes
  backend: str     # 'cpu' (interpret mode), 'gpu' (Triton) or 'tpu' (Mosaic)
  interpret: bool = False  # run `backend`'s kernels in interpret mode (tests of the TPU layout)

  @property
  def tpu(self) -> bool:
    """TPU layout: q, k, v, O as (B, T, H·D) with every head in each grid step, no padding."""
    return self.backend == 'tpu'

  def call_args(self, name: str, tiles: Tiles, grid_rank: int) -> dict:
    """pallas_call keyword arguments for this backend."""
    if self.backend == 'cpu' or self.interpret:
      return dict(interpret=True, name=name)
    if self.backend == 'gpu':
      # jax 0.10 lowers pallas_call to Mosaic GPU unless given Triton parameters; the kernels
      # are written for Triton (pl.ds slices of refs, fori_loop over tiles).
      from jax.experimental.pallas import triton as pl_triton
      return dict(name=name, compiler_params=pl_triton.CompilerParams(
          num_warps=tiles.num_warps, num_stages=tiles.num_stages))
    if self.backend == 'tpu':
      from jax.experimental.pallas import tpu as pl_tpu
      return dict(name=name, compiler_params=pl_tpu.CompilerParams(
          dimension_semantics=('parallel',) * grid_rank))
    raise ValueError(f'pallas attention: unsupported backend {self.backend!r}')


def _tile_logits(q, k, qid, kid, u_pos, u_neg, k_start, st: _Static):
  """(q·kᵀ + b)·scale of one (block_q, block_k) tile; padded keys → MASK_VALUE.

  Returns the logits and the same-/different-segment masks (None without the bias).
  """
  s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32)
  pos = neg = None
  if qid is not None:
    known = (qid != 0) & (kid != 0)          # (bq, 1) vs (1, bk) → (bq, bk)
    same = qid == kid
    pos, neg = known & same, known & ~same
    s = s + jnp.where(pos, u_pos, jnp.where(neg, u_neg, 0.0))  # u: (1, 1) per head
  s = s * st.scale
  if st.kv_len % k.shape[0]:  # only the last key tile can hold padding
    col = k_start + lax.broadcasted_iota(jnp.int32, (1, k.shape[0]), 1)
    s = jnp.where(col < st.kv_len, s, MASK_VALUE)
  return s, pos, neg


def _valid_rows(start, n: int, length: int):
  """(n, 1) mask of the rows start.. of a tile that lie before `length`."""
  return start + lax.broadcasted_iota(jnp.int32, (n, 1), 0) < length


def _rows(ref, start, n: int, cols: slice, length: int, st: _Static):
  """Rows start..start+n of one head's columns of a (rows, heads·D) ref. On TPU the arrays
  are not padded: rows past `length` in the last tile are whatever the buffer holds (NaN in
  interpret mode), and 0·NaN = NaN in a matmul, so they are zeroed (only when T is not a
  multiple of the tile: a static check)."""
  x = ref[pl.ds(start, n), cols]
  if st.tpu and length % n:
    x = jnp.where(_valid_rows(start, n, length), x, jnp.zeros_like(x))
  return x


def _key_tile(j, bk: int, k_ref, v_ref, kid_ref, cols: slice, st: _Static):
  """Key tile j of one head of whole-sequence K, V refs: its start, K, V and key ids (None
  without bias)."""
  start = pl.multiple_of(j * bk, bk)
  return (start, _rows(k_ref, start, bk, cols, st.kv_len, st),
          _rows(v_ref, start, bk, cols, st.kv_len, st),
          None if kid_ref is None else kid_ref[j])


def _dot_t(a, b, st: _Static):
  """aᵀ·b in float32, a cast to b's dtype (Pᵀ·dO, dSᵀ·Q). TPU: one dot_general contracting the
  query axis of both tiles, no transpose written in the kernel (Mosaic feeds the MXU either
  operand order). GPU and interpret mode: the explicit transpose their ptxas table and
  reference tests were measured with."""
  if st.tpu:
    return lax.dot_general(a.astype(b.dtype), b, TN, preferred_element_type=jnp.float32)
  return lax.dot(a.T.astype(b.dtype), b, preferred_element_type=jnp.float32)


def _heads_per_program(st: _Static) -> int:
  """Heads one program handles: all of them on TPU (a grid step has a fixed cost, and one
  head's 128-row tile at T = 256 is ~8 MFLOP, 43 ns of a v5e), one on GPU."""
  return st.heads if st.tpu else 1


def _head_cols(h: int, st: _Static) -> slice:
  """Columns of head h in a (rows, heads·D) block (GPU: one head per program, h = 0)."""
  return slice(h * st.head_dim, (h + 1) * st.head_dim)


def _fwd_kernel(*refs, st: _Static, bk: int, num_k: int, use_bias: bool):
  """One query tile of each head in the block: stream all key tiles, online softmax; writes O
  and the log-sum-exp."""
  if use_bias:
    q_ref, k_ref, v_ref, qid_ref, kid_ref, up_ref, un_ref, o_ref, lse_ref = refs
    qid = qid_ref[...]
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    qid = kid_ref = None
  for h in range(_heads_per_program(st)):
    cols = _head_cols(h, st)
    u_pos, u_neg = (up_ref[h], un_ref[h]) if use_bias else (None, None)
    q = q_ref[:, cols]
    bq = q.shape[0]

    def body(j, carry, q=q, cols=cols, u_pos=u_pos, u_neg=u_neg):
      acc, m, l = carry
      start, k, v, kid = _key_tile(j, bk, k_ref, v_ref, kid_ref, cols, st)
      s, _, _ = _tile_logits(q, k, qid, kid, u_pos, u_neg, start, st)
      m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new)
      l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
      acc = alpha * acc + lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
      return acc, m_new, l

    init = (jnp.zeros((bq, st.head_dim), jnp.float32), jnp.full((bq, 1), -jnp.inf, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_k, body, init)
    o_ref[:, cols] = (acc / l).astype(o_ref.dtype)
    lse_ref[:, h:h + 1] = m + jnp.log(l)


def _dq_kernel(*refs, st: _Static, bk: int, num_k: int, use_bias: bool):
  """One query tile of each head in the block: dQ and the per-row sums of dS over same /
  different pairs (× scale)."""
  if use_bias:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qid_ref, kid_ref, up_ref, un_ref,
     dq_ref, dup_ref, dun_ref) = refs
    qid = qid_ref[...]
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    qid = kid_ref = None
  for h in range(_heads_per_program(st)):
    cols = _head_cols(h, st)
    u_pos, u_neg = (up_ref[h], un_ref[h]) if use_bias else (None, None)
    q, do = q_ref[:, cols], do_ref[:, cols]
    lse, delta = lse_ref[:, h:h + 1], delta_ref[:, h:h + 1]

    def body(j, carry, q=q, do=do, lse=lse, delta=delta, cols=cols, u_pos=u_pos, u_neg=u_neg):
      dq, dup, dun = carry
      start, k, v, kid = _key_tile(j, bk, k_ref, v_ref, kid_ref, cols, st)
      s, pos, neg = _tile_logits(q, k, qid, kid, u_pos, u_neg, start, st)
      p = jnp.exp(s - lse)                       # recomputed, never stored
      dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
      ds = p * (dp - delta)                      # dL/d(scaled logits)
      dq = dq + lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
      if use_bias:
        dup = dup + jnp.sum(jnp.where(pos, ds, 0.0), axis=1, keepdims=True)
        dun = dun + jnp.sum(jnp.where(neg, ds, 0.0), axis=1, keepdims=True)
      return dq, dup, dun

    zeros = jnp.zeros((q.shape[0], 1), jnp.float32)
    dq, dup, dun = lax.fori_loop(0, num_k, body,
                                 (jnp.zeros(q.shape, jnp.float32), zeros, zeros))
    dq_ref[:, cols] = (dq * st.scale).astype(dq_ref.dtype)
    if use_bias:  # the bias sits inside the scaling: d b = scale · dS
      dup_ref[:, h:h + 1] = dup * st.scale
      dun_ref[:, h:h + 1] = dun * st.scale


def _dkv_kernel(*refs, st: _Static, bq: int, num_q: int, use_bias: bool):
  """One key tile of each head in the block: stream all query tiles; dK and dV."""
  if use_bias:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qid_ref, kid_ref, up_ref, un_ref,
     dk_ref, dv_ref) = refs
    kid = kid_ref[...]
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    kid = None
  bk = k_ref.shape[0]
  k_start = pl.program_id(1 if st.tpu else 2) * bk
  for h in range(_heads_per_program(st)):
    cols = _head_cols(h, st)
    u_pos, u_neg = (up_ref[h], un_ref[h]) if use_bias else (None, None)
    k, v = k_ref[:, cols], v_ref[:, cols]

    def body(i, carry, k=k, v=v, cols=cols, u_pos=u_pos, u_neg=u_neg):
      dk, dv = carry
      start = pl.multiple_of(i * bq, bq)
      rows = pl.ds(start, bq)
      q = _rows(q_ref, start, bq, cols, st.q_len, st)
      do = _rows(do_ref, start, bq, cols, st.q_len, st)
      qid = qid_ref[rows, :] if use_bias else None
      # Rows past the end (TPU): q, dO, lse and delta zeroed, so P there is finite and meets
      # only zero dO rows (dV), and dS = P·(0 − 0) = 0 there (dK).
      lse = _rows(lse_ref, start, bq, slice(h, h + 1), st.q_len, st)
      delta = _rows(delta_ref, start, bq, slice(h, h + 1), st.q_len, st)
      s, _, _ = _tile_logits(q, k, qid, kid, u_pos, u_neg, k_start, st)
      p = jnp.exp(s - lse)
      dv = dv + _dot_t(p, do, st)
      dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
      ds = p * (dp - delta)
      dk = dk + _dot_t(ds, q, st)
      return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, num_q, body, (zeros, zeros))
    dk_ref[:, cols] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[:, cols] = dv.astype(dv_ref.dtype)


def _whole_sequence_bytes(st: _Static, t_pad: int, itemsize: int) -> int:
  """VMEM of the whole-sequence blocks of the larger TPU kernel (dK/dV: Q and dO, the lse,
  delta and query-id columns, each a 128-lane row per token in VMEM), one copy."""
  return t_pad * (2 * st.heads * st.head_dim * itemsize + 3 * 128 * 4)


def _specs(st: _Static, tiles: Tiles, tq: int, tk: int, use_bias: bool, itemsize: int):
  """BlockSpecs of one kernel's tiles, keyed by what they hold.

  'q_tile'/'k_tile' = one tile indexed by the grid's last axis; '*_all' = the whole padded
  sequence of that batch row (and head), sliced inside the kernel. GPU: grid (batch, head,
  tile) over (B, H, T_pad, D) arrays, one head per program. TPU: grid (batch, tile) over
  (B, T, H·D) arrays, every head in each program; blocks may run past the array's end (rows
  the kernels zero or drop), and the heads share the lane axis, so each block's last two dims
  are (rows, H·D), as Mosaic requires of a block's minor dims (a multiple of (8, 128) or the
  whole dim). The whole-sequence blocks change only with the batch row; Pallas double-buffers
  them (the next row's DMA overlaps this row's work) unless two copies would pass half of
  `TPU_WHOLE_SEQUENCE_VMEM`, where they get one buffer (a wait per batch row) so long
  sequences still fit a v4's 16 MiB of VMEM.
  """
  bq, bk = tiles.block_q, tiles.block_k
  if st.tpu:
    spec = lambda shape, index: pl.BlockSpec(shape, lambda b, i: index(b, 0, i))
    whole = spec
    if _whole_sequence_bytes(st, max(tq, tk), itemsize) > TPU_WHOLE_SEQUENCE_VMEM // 2:
      whole = lambda shape, index: pl.BlockSpec(shape, lambda b, i: index(b, 0, i),
                                                pipeline_mode=pl.Buffered(1))
    width = st.heads * st.head_dim
    sp = {
        'q_tile': spec((None, bq, width), lambda b, h, i: (b, i, 0)),
        'q_all': whole((None, tq, width), lambda b, h, i: (b, 0, 0)),
        'k_tile': spec((None, bk, width), lambda b, h, j: (b, j, 0)),
        'k_all': whole((None, tk, width), lambda b, h, i: (b, 0, 0)),
        'row_tile': spec((None, bq, st.heads), lambda b, h, i: (b, i, 0)),
        'row_all': whole((None, tq, st.heads), lambda b, h, j: (b, 0, 0)),
        'u': spec((st.heads, 1, 1), lambda b, h, i: (0, 0, 0)),
    }
  else:
    spec = whole = pl.BlockSpec
    d = st.head_dim
    sp = {
        'q_tile': spec((None, None, bq, d), lambda b, h, i: (b, h, i, 0)),
        'q_all': spec((None, None, tq, d), lambda b, h, i: (b, h, 0, 0)),
        'k_tile': spec((None, None, bk, d), lambda b, h, j: (b, h, j, 0)),
        'k_all': spec((None, None, tk, d), lambda b, h, i: (b, h, 0, 0)),
        'row_tile': spec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0)),
        'row_all': spec((None, None, tq, 1), lambda b, h, j: (b, h, 0, 0)),
        'u': spec((1, 1, 1), lambda b, h, i: (h, 0, 0)),
    }
  if use_bias:
    sp.update({
        'qid_tile': spec((None, bq, 1), lambda b, h, i: (b, i, 0)),
        'qid_all': whole((None, tq, 1), lambda b, h, j: (b, 0, 0)),
        'kid_tile': spec((None, None, 1, bk), lambda b, h, j: (b, j, 0, 0)),
        'kid_all': whole((None, tk // bk, 1, bk), lambda b, h, i: (b, 0, 0, 0)),
    })
  return sp


def _key_tiles(kid, block_k: int):
  """Key ids (B, T_pad) → (B, T_pad / block_k, 1, block_k): one (1, block_k) row per key tile
  (Mosaic's block rule; each kernel tiles the keys its own way)."""
  return kid.reshape(kid.shape[0], kid.shape[1] // block_k, 1, block_k)


def _grid(st: _Static, b: int, tiles: int) -> tuple:
  """Grid of a kernel with `tiles` tiles per sequence: (batch, head, tile) on GPU, (batch,
  tile) on TPU."""
  return (b, tiles) if st.tpu else (b, st.heads, tiles)


def _row_shape(st: _Static, b: int, tq: int) -> tuple:
  """Shape of a per-row, per-head float32 array (log-sum-exp, delta, d u partials)."""
  return (b, st.q_len, st.heads) if st.tpu else (b, st.heads, tq, 1)


def _cost(st: _Static, b: int, matmuls: int, args, outs) -> pl.CostEstimate:
  """What one kernel does, for XLA's cost model (a custom call is otherwise free to it): the
  padded (T_q, T_k) tiles of `matmuls` matmuls and one exp per logit, per head."""
  tq, tk = st.blocks.padded(st.q_len, st.kv_len)
  logits = b * st.heads * tq * tk
  nbytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x in (*args, *outs) if x is not None)
  return pl.CostEstimate(flops=2 * matmuls * logits * st.head_dim, transcendentals=logits,
                         bytes_accessed=nbytes)


def _forward(st: _Static, q, k, v, qid, kid, u_pos, u_neg):
  """Kernel layout (GPU (B, H, T_pad, D), TPU (B, T, H·D)) → O in that layout and the
  log-sum-exp (`_row_shape`) float32."""
  b = q.shape[0]
  tq, tk = st.blocks.padded(st.q_len, st.kv_len)
  tiles = st.blocks.fwd
  use_bias = qid is not None
  sp = _specs(st, tiles, tq, tk, use_bias, q.dtype.itemsize)
  in_specs = [sp['q_tile'], sp['k_all'], sp['k_all']]
  args = [q, k, v]
  if use_bias:
    in_specs += [sp['qid_tile'], sp['kid_all'], sp['u'], sp['u']]
    args += [qid, _key_tiles(kid, tiles.block_k), u_pos, u_neg]
  grid = _grid(st, b, tq // tiles.block_q)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct(_row_shape(st, b, tq), jnp.float32)]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, bk=tiles.block_k, num_k=tk // tiles.block_k,
                        use_bias=use_bias),
      grid=grid, in_specs=in_specs, out_specs=[sp['q_tile'], sp['row_tile']],
      out_shape=out_shape, cost_estimate=_cost(st, b, 2, args, out_shape),
      **st.call_args('mre_flash_fwd', tiles, len(grid)))(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, qid, kid, u_pos, u_neg):
  return _forward(st, q, k, v, qid, kid, u_pos, u_neg)[0]


def _attention_fwd(st, q, k, v, qid, kid, u_pos, u_neg):
  out, lse = _forward(st, q, k, v, qid, kid, u_pos, u_neg)
  return out, (q, k, v, qid, kid, u_pos, u_neg, out, lse)


def _delta(st: _Static, do, out):
  """delta_i = Σ_d dO_id · O_id per row and head (FlashAttention-2's D), in `_row_shape`."""
  prod = do.astype(jnp.float32) * out.astype(jnp.float32)
  if st.tpu:  # (B, T, H·D) → (B, T, H)
    return jnp.sum(prod.reshape(*prod.shape[:2], st.heads, st.head_dim), axis=-1)
  return jnp.sum(prod, axis=-1, keepdims=True)


def _attention_bwd(st, res, do):
  q, k, v, qid, kid, u_pos, u_neg, out, lse = res
  b = q.shape[0]
  tq, tk = st.blocks.padded(st.q_len, st.kv_len)
  use_bias = qid is not None
  # delta: O(T·D), left to XLA. O is kept in the input dtype (FlashAttention-2 and cuDNN do
  # the same; a float32 copy would add B·T·H·D·4 bytes per layer): in bf16 its rounding
  # leaves rows of dS summing to ±u·|dO·O| instead of 0, which d u (a sum of dS that mostly
  # cancels) feels most — see the bf16 test's bound.
  args = [q, k, v, do, lse, _delta(st, do, out)]
  bias_args = lambda tiles: [qid, _key_tiles(kid, tiles.block_k), u_pos, u_neg] if use_bias else []

  tiles = st.blocks.dq
  sp = _specs(st, tiles, tq, tk, use_bias, q.dtype.itemsize)
  dq_in = [sp['q_tile'], sp['k_all'], sp['k_all'], sp['q_tile'], sp['row_tile'], sp['row_tile']]
  dq_out = [sp['q_tile']]
  dq_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if use_bias:
    dq_in += [sp['qid_tile'], sp['kid_all'], sp['u'], sp['u']]
    dq_out += [sp['row_tile']] * 2
    dq_shape += [jax.ShapeDtypeStruct(_row_shape(st, b, tq), jnp.float32)] * 2
  grid = _grid(st, b, tq // tiles.block_q)
  dq_res = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, bk=tiles.block_k, num_k=tk // tiles.block_k,
                        use_bias=use_bias),
      grid=grid, in_specs=dq_in, out_specs=dq_out, out_shape=dq_shape,
      cost_estimate=_cost(st, b, 3, args + bias_args(tiles), dq_shape),
      **st.call_args('mre_flash_dq', tiles, len(grid)))(*args, *bias_args(tiles))

  tiles = st.blocks.dkv
  sp = _specs(st, tiles, tq, tk, use_bias, q.dtype.itemsize)
  dkv_in = [sp['q_all'], sp['k_tile'], sp['k_tile'], sp['q_all'], sp['row_all'], sp['row_all']]
  if use_bias:
    dkv_in += [sp['qid_all'], sp['kid_tile'], sp['u'], sp['u']]
  grid = _grid(st, b, tk // tiles.block_k)
  dkv_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, bq=tiles.block_q, num_q=tq // tiles.block_q,
                        use_bias=use_bias),
      grid=grid, in_specs=dkv_in, out_specs=[sp['k_tile']] * 2, out_shape=dkv_shape,
      cost_estimate=_cost(st, b, 4, args + bias_args(tiles), dkv_shape),
      **st.call_args('mre_flash_dkv', tiles, len(grid)))(*args, *bias_args(tiles))

  if not use_bias:
    return dq_res[0], dk, dv, None, None, None, None
  dq, dup, dun = dq_res
  # Per-row partial sums → one number per head (u enters as (H, 1, 1)).
  rows = (0, 1) if st.tpu else (0, 2, 3)
  du = lambda part: jnp.sum(part, axis=rows).reshape(u_pos.shape).astype(u_pos.dtype)
  return dq, dk, dv, None, None, du(dup), du(dun)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_to(x: jnp.ndarray, axis: int, size: int) -> jnp.ndarray:
  """Zero-pads `axis` at the end to `size` (ids pad with 0 = unknown: no bias)."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def flash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, scale: float,
                    segments: Optional[SegmentTerms] = None,
                    kv_segment_ids: Optional[jnp.ndarray] = None,
                    block_q: Optional[int] = None, block_k: Optional[int] = None,
                    blocks: Optional[BlockSizes] = None,
                    backend: Optional[str] = None, interpret: bool = False) -> jnp.ndarray:
  """softmax((q·kᵀ + b)·scale)·v on (B, T, H, D) q and (B, S, H, D) k, v → (B, T, H, D).

  `segments` (ids (B, T), u_pos / u_neg (H,)) switches the MRE bias on; the query ids are
  `segments.ids` and the key ids `kv_segment_ids` (default: the same ids, self-attention).
  Tiles: `blocks`, else `block_q`/`block_k` for all three kernels, else `default_blocks`.
  On GPU the head dim is zero-padded to `kernel_head_dim` (exact: zero columns add nothing
  to q·kᵀ and give output columns that are dropped). `backend` ('cpu' = interpret mode,
  'gpu' = Triton, 'tpu' = Mosaic) defaults to `platform()`; naming one lets a CPU host lower
  one kernel by hand for another platform, and `interpret=True` runs that backend's kernels
  (their layout and tiles) in Pallas interpret mode. Under a mesh the call is split over its
  batch axes (`per_device`).
  """
  b, t, h, d = q.shape
  s_len = k.shape[1]
  backend = backend or platform()
  dk = kernel_head_dim(d, backend)
  if blocks is None and (block_q or block_k):
    blocks = BlockSizes.uniform(block_q or block_size(t), block_k or block_size(s_len))
  blocks = blocks or default_blocks(t, s_len, dk, backend)
  if backend == 'tpu':
    check_tpu_blocks(blocks)
  tq, tk = blocks.padded(t, s_len)
  st = _Static(float(scale), t, s_len, h, dk, blocks, backend, interpret)
  if st.tpu:  # (B, T, H·D), a reshape (no copy, no padding): blocks may pass the end
    to_kernel = lambda x, n: x.reshape(b, x.shape[1], h * d)
    from_kernel = lambda out: out.reshape(b, t, h, d)
  else:       # (B, H, T_pad, D_k)
    to_kernel = lambda x, n: _pad_to(_pad_to(jnp.swapaxes(x, 1, 2), 2, n), 3, dk)
    from_kernel = lambda out: jnp.swapaxes(out[:, :, :t, :d], 1, 2)
  qid = kid = u_pos = u_neg = None
  if segments is not None:  # ids pad with 0 (tiny arrays): whole tiles of them
    ids = segments.ids.astype(jnp.int32)
    kv_ids = ids if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    qid = _pad_to(ids, 1, tq)[:, :, None]                                   # (B, Tq, 1)
    kid = _pad_to(kv_ids, 1, tk)                                            # (B, Tk)
    u = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (h,)).reshape(h, 1, 1)
    u_pos, u_neg = u(segments.u_pos), u(segments.u_neg)
  kernel = lambda q, k, v, qid, kid, u_pos, u_neg: _attention(st, q, k, v, qid, kid, u_pos,
                                                              u_neg)
  out = per_device(kernel, 5)(to_kernel(q, tq), to_kernel(k, tk), to_kernel(v, tk),
                              qid, kid, u_pos, u_neg)
  return from_kernel(out)


def per_device(fn, num_batched: int):
  """`fn` run by every device of the current mesh on its own rows: its first `num_batched`
  arguments (None allowed) are split on their leading (batch) dim over the mesh's free batch
  axes, the rest replicated (their gradients summed); its one output is split like the batch.
  Without a mesh (or with every axis already manual, e.g. inside the caller's shard_map) it is
  `fn` itself. A batch that does not divide over those axes (the batch of one an init traces)
  is replicated: every device runs the whole call."""
  mesh = jax.sharding.get_abstract_mesh()
  free = () if mesh.empty else tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
  if not free:
    return fn
  axes = tuple(a for a in BATCH_AXES if a in free)

  def call(*args):
    given = [i for i, a in enumerate(args) if a is not None]  # shard_map takes no None
    split = math.prod(mesh.shape[a] for a in axes)
    if split == 1 or args[given[0]].shape[0] % split:
      split = 1
    spec = P(axes) if split > 1 else P()
    # Replicated arguments go in as one copy per device (a leading axis split like the batch),
    # so the transpose of the broadcast sums their per-device gradients: the kernels' outputs
    # carry no varying-axes types, hence check_vma=False, which would not sum them itself.
    copies = lambda i, x: x if i < num_batched else jnp.broadcast_to(x, (split,) + x.shape)

    def local(*xs):
      full = [None] * len(args)
      for i, x in zip(given, xs):
        full[i] = x if i < num_batched else x[0]
      return fn(*full)

    return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec,
                         axis_names=set(free), check_vma=False)(
                             *(copies(i, args[i]) for i in given))

  return call
