"""The package's layers (docs/design.md) are a checked contract: `lint-imports` reads the
contracts in pyproject.toml and fails on an upward import or on torch in a training module."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lint_imports() -> str:
  exe = shutil.which('lint-imports') or os.path.join(os.path.dirname(sys.executable),
                                                     'lint-imports')
  if not os.path.exists(exe):
    pytest.fail('lint-imports is not installed: pip install -e ".[dev]" (import-linter)')
  return exe


def test_import_contracts_hold():
  out = subprocess.run([_lint_imports()], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
  assert 'Contracts: 2 kept, 0 broken.' in out.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
  """The contract is not vacuous: a model importing the trainer is reported."""
  bad = os.path.join(REPO, 'mimjax', 'models', '_upward_import_probe.py')
  with open(bad, 'w') as f:
    f.write('from mimjax.train import trainer  # noqa: F401\n')
  try:
    out = subprocess.run([_lint_imports()], cwd=REPO, capture_output=True, text=True)
  finally:
    os.remove(bad)
  assert out.returncode != 0
  assert 'mimjax.models._upward_import_probe -> mimjax.train.trainer' in out.stdout
