"""mimjax.cli: config paths from any directory, one-line flag errors and `--help` → 0, for
every entry point (main's own cases: tests/test_main.py)."""

import os
import subprocess
import sys

import pytest

from mimjax import cli
from tests.env import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prepare_argv_finds_the_repository_configs_from_elsewhere(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, 'path', list(sys.path))
  argv = ['prog', '--config', 'configs/mae.py:tiny', '--devices', '2']
  cli.prepare_argv(argv)
  assert argv == ['prog', '--config', os.path.join(REPO, 'configs/mae.py') + ':tiny',
                  '--devices', '2']
  assert REPO in sys.path


def test_prepare_argv_prefers_a_file_relative_to_here(tmp_path, monkeypatch):
  """A user's own config package next to them wins over the repository's, and its parent goes
  on sys.path so it can import its siblings."""
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / '__init__.py').write_text('')
  (tmp_path / 'mine' / 'mae.py').write_text('')
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, 'path', list(sys.path))
  argv = ['prog', '--config=mine/mae.py:tiny']
  cli.prepare_argv(argv)
  assert argv == ['prog', '--config=mine/mae.py:tiny']
  assert str(tmp_path) in sys.path


def _run(module, *args, cwd):
  env = subprocess_env(1, PYTHONPATH=REPO, MIMJAX_COMPILATION_CACHE='off')
  return subprocess.run([sys.executable, '-m', module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('module,args,message', [
    ('mimjax.plan', ['--config', 'configs/mae.py:vit_z'],
     "mimjax.plan: error: --config: ValueError: config arg 'vit_z': cannot parse 'vit_z'"),
    ('mimjax.sam', ['--config', 'configs/nope.py:tiny', '--workdir', 'w'],
     'mimjax.sam: error: --config configs/nope.py: no such file'),
    ('mimjax.convert', ['--workdir', 'w', '--format', 'tim'],
     "mimjax.convert: error: argument --format: invalid choice: 'tim'"),
    ('mimjax.data.build', ['digit'], "mimjax.data.build: error: argument name: invalid choice"),
])
def test_flag_errors_are_one_line_from_any_directory(tmp_path, module, args, message):
  out = _run(module, *args, cwd=tmp_path)
  assert out.returncode == 2, out.stderr
  assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith(message), out.stderr
  assert os.listdir(tmp_path) == []


def test_help_exits_zero(tmp_path):
  out = _run('mimjax.plan', '--help', cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert '--devices' in out.stdout and '--config' in out.stdout
