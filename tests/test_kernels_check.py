"""Offline check of the attention kernels (mimjax/kernels_check.py), no GPU or TPU needed.

GPU: the kernels lowered for CUDA here, compiled by Triton for sm_80/sm_90a, read by
`ptxas -v`. Default set: one shape (T = 50, D = 80, which needs the head-dim padding) on
sm_90a, and a kernel that cannot lower reported as a failure. `-m slow`: every shape and
target of the command (about a minute, or two with a cold Triton cache), and 128×128 tiles
(the tiles before issue 25) reported as spilling.

TPU: forward + backward compiled by XLA:TPU/Mosaic (libtpu) for a compile-only v5e chip.
Default set: T = 50, D = 64 compiles with every head in one grid step (~4 s), and a shape that
cannot compile fails the check. `-m slow`: every shape on v5e and v4 (~2 minutes).
"""

import importlib.util

import pytest

from mimjax import kernels_check
from mimjax.models import pallas_attention
from tests.hlo import needs_libtpu

KERNELS = ['mre_flash_fwd', 'mre_flash_dq', 'mre_flash_dkv']
needs_triton = pytest.mark.skipif(importlib.util.find_spec('triton') is None,
                                  reason='triton (the [dev] extra) is not installed')


@needs_triton
def test_one_shape_compiles_without_spills_within_shared_memory():
  rows = kernels_check.check(('sm_90a',), (50,), (80,))
  assert [r.kernel for r in rows] == KERNELS
  for r in rows:
    assert r.ok(), kernels_check.table(rows)
    assert 0 < r.registers <= 255 and 0 < r.shared <= kernels_check.ARCHS['sm_90a'][1]


def _assert_check_fails(argv: list, says: tuple, summary: str, capsys) -> None:
  """`kernels_check.main(argv)` exits 1, its table says every phrase of `says` and its
  summary line on stderr says `summary`."""
  assert kernels_check.main(argv) == 1
  captured = capsys.readouterr()
  assert all(phrase in captured.out for phrase in says), captured.out
  assert summary in captured.err


@needs_triton
def test_kernel_that_cannot_lower_fails_the_check(monkeypatch, capsys):
  # Without the padding to a power of two, D = 80 cannot lower for Triton (as before issue 25).
  monkeypatch.setattr(pallas_attention, 'kernel_head_dim', lambda d, backend: d)
  _assert_check_fails(['--arch', 'sm_90a', '--seq', '50', '--head-dim', '80'],
                      ('does not lower', 'power of 2'), '1 of 1 kernels', capsys)


@pytest.mark.slow
@needs_triton
def test_every_shape_and_target_compiles_without_spills(capsys):
  assert kernels_check.main([]) == 0
  lines = capsys.readouterr().out.splitlines()[1:]
  assert len(lines) == 2 * 3 * 2 * 3 and all(line.endswith('yes') for line in lines)


@pytest.mark.slow
@needs_triton
def test_large_tiles_are_reported_as_spilling(monkeypatch):
  monkeypatch.setattr(pallas_attention, 'default_blocks',
                      lambda t, s, d, backend: pallas_attention.BlockSizes.uniform(128, 128))
  rows = kernels_check.check(('sm_90a',), (197,), (64,))
  assert [r.kernel for r in rows] == KERNELS
  assert all(r.spill_stores > 0 and not r.ok() for r in rows), kernels_check.table(rows)


@needs_libtpu
def test_tpu_shape_compiles_with_every_head_in_a_grid_step():
  [row] = kernels_check.tpu_check(('v5e',), (50,), (64,))
  assert row.ok(), row.error
  assert [k.name for k in row.kernels] == KERNELS
  # 50 tokens pad to one 128-row tile: one grid step per batch row for each kernel, each
  # doing the matmuls (2, 3, 4 of them) of all 12 heads on a 128×128 tile.
  assert [k.grid for k in row.kernels] == [(kernels_check.BATCH, 1)] * 3
  tile = 2 * kernels_check.HEADS * 128 * 128 * 64
  assert [k.step_flops() for k in row.kernels] == [2 * tile, 3 * tile, 4 * tile]
  # The kernels' cost estimates reach XLA's cost analysis (a custom call is otherwise free).
  assert row.flops >= sum(k.flops for k in row.kernels) > 0 and row.bytes_accessed > 0


@needs_libtpu
def test_tpu_shape_that_cannot_compile_fails_the_check(monkeypatch, capsys):
  monkeypatch.setattr(pallas_attention, 'default_blocks',
                      lambda t, s, d, backend: pallas_attention.BlockSizes.uniform(64, 64))
  _assert_check_fails(['--tpu', 'v5e', '--seq', '50', '--head-dim', '64'],
                      ('does not compile', 'multiples of 128'), '1 of 1 shapes', capsys)


@pytest.mark.slow
@needs_libtpu
def test_every_tpu_shape_compiles(capsys):
  assert kernels_check.main(['--tpu', 'v5e', 'v4']) == 0
  lines = capsys.readouterr().out.splitlines()[1:]
  assert len(lines) == 2 * 3 * 2 and all(line.endswith('yes') for line in lines)
