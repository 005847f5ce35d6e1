"""Offline GPU check of the attention kernels (mimjax/kernels_check.py), no GPU needed: the
kernels lowered for CUDA here, compiled by Triton for sm_80/sm_90a, read by `ptxas -v`.

Default set: one shape (T = 50, D = 80, which needs the head-dim padding) on sm_90a, and a
kernel that cannot lower reported as a failure. `-m slow`: every shape and target of the
command (about a minute, or two with a cold Triton cache), and 128×128 tiles (the tiles before
issue 25) reported as spilling.
"""

import pytest

pytest.importorskip('triton')

from mimjax import kernels_check  # noqa: E402
from mimjax.models import pallas_attention  # noqa: E402

KERNELS = ['mre_flash_fwd', 'mre_flash_dq', 'mre_flash_dkv']


def test_one_shape_compiles_without_spills_within_shared_memory():
  rows = kernels_check.check(('sm_90a',), (50,), (80,))
  assert [r.kernel for r in rows] == KERNELS
  for r in rows:
    assert r.ok(), kernels_check.table(rows)
    assert 0 < r.registers <= 255 and 0 < r.shared <= kernels_check.ARCHS['sm_90a'][1]


def test_kernel_that_cannot_lower_fails_the_check(monkeypatch, capsys):
  # Without the padding to a power of two, D = 80 cannot lower for Triton (as before issue 25).
  monkeypatch.setattr(pallas_attention, 'kernel_head_dim', lambda d, backend: d)
  assert kernels_check.main(['--arch', 'sm_90a', '--seq', '50', '--head-dim', '80']) == 1
  captured = capsys.readouterr()
  assert 'does not lower' in captured.out and 'power of 2' in captured.out
  assert '1 of 1 kernels' in captured.err


@pytest.mark.slow
def test_every_shape_and_target_compiles_without_spills(capsys):
  assert kernels_check.main([]) == 0
  lines = capsys.readouterr().out.splitlines()[1:]
  assert len(lines) == 2 * 3 * 2 * 3 and all(line.endswith('yes') for line in lines)


@pytest.mark.slow
def test_large_tiles_are_reported_as_spilling(monkeypatch):
  monkeypatch.setattr(pallas_attention, 'default_blocks',
                      lambda t, s, d, backend: pallas_attention.BlockSizes.uniform(128, 128))
  rows = kernels_check.check(('sm_90a',), (197,), (64,))
  assert [r.kernel for r in rows] == KERNELS
  assert all(r.spill_stores > 0 and not r.ok() for r in rows), kernels_check.table(rows)
