"""Every command printed in README.md, the configs' docstrings and docs/*.md runs as written.

Collected automatically: the `python …` lines (incl. `.venv/bin/python`, `VAR=value python`,
backslash continuations) of README.md's and docs/*.md's fenced blocks that are not ```python
snippets, and of the module docstrings of configs/*.py and configs/eval/*.py. Shell loops,
launchers, `wget`, `nvidia-smi`, `tensorboard` and `pytest` lines are not commands of this
library and are not collected. Each command runs once, in the order found, in a temp dir (with
`configs` linked in) where `/tmp/…` paths are rewritten to that dir; training commands get
`--config.total_steps=2` appended, benchmarks `--steps 1 --warmup 0`. A command that reads what
an earlier one writes (an evaluation of workdirs/mae_tiny, a conversion of its checkpoint) first
runs that command (PRODUCERS). Commands that need what cannot exist here are listed in SKIP
with the reason; nothing is skipped silently.

Default set: the cheapest command of every file (its first one that is neither skipped nor
SLOW, plus what it needs); `-m slow` runs all the others. Subprocesses share a persistent JAX
compilation cache (tests/conftest.py) so re-runs mostly skip XLA compilation.
"""

import ast
import functools
import importlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest
from tests.env import subprocess_env

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
TIMEOUT_S = 900

# (regex on the command, why it cannot run here). Reviewed; every entry must match a command.
SKIP = [
    (r'^(?!.*mimjax\.plan ).*:\S*\bin(1k|100)\b',
     'an ImageNet-1k/-100 row: needs the prepared ImageNet (docs/data.md)'),
    (r'mimjax\.data\.build \w+ --source (DIR|/data)',
     "builds from the user's image folder / the ImageNet archives"),
    (r'--config\.batch_size=256', 'a GPU benchmark (B/16 at batch 256, cuDNN attention)'),
]
# Runnable but minutes on a CPU: not chosen as a file's default command (they run with -m slow).
SLOW = [
    (r'configs/sam\.py:tiny(\s|$)', 'a random SAM ViT on 18 photos: 1-4 min on 2 cores'),
    (r'configs/\w+\.py:vit_b\b', 'B/16 at 224 px on a CPU'),
    (r'--torch (eager|compile)', 'times the PyTorch reference as well'),
    (r'mimjax\.plan .*--devices 64', 'compiles a paper row for 64 fake devices: minutes on 2 cores'),
    (r'mimjax\.plan .*--target tpu:', 'compiles with XLA:TPU (libtpu): a minute to hours on 2 cores'),
]
# Paths a command reads → the documented command that writes them (run first if needed).
PRODUCERS = {
    'workdirs/mae_tiny': ('python -m mimjax.main --config configs/mae.py:tiny '
                          '--workdir workdirs/mae_tiny'),
    '/tmp/sp_tiny': ('python -m mimjax.sam --config configs/sam.py:tiny,superpixel '
                     '--workdir /tmp/sp_tiny'),
    '/tmp/sam_tiny': 'python -m mimjax.sam --config configs/sam.py:tiny --workdir /tmp/sam_tiny',
    'workdirs/sam_tiny': ('python -m mimjax.sam --config configs/sam.py:tiny '
                          '--workdir workdirs/sam_tiny'),
    '/tmp/mre_mae_tiny': ('python -m mimjax.main --config configs/mre_mae.py:tiny --workdir '
                          '/tmp/mre_mae_tiny --config.data.name=photos '
                          '--config.data.data_dir=/tmp/sp_tiny --config.batch_size=16'),
    '/tmp/jpegs': 'python -m mimjax.bench --make_jpegs /tmp/jpegs',
    '/tmp/jpeg_data': ('python -m mimjax.data.build image_folder --source /tmp/jpegs '
                       '--data_dir /tmp/jpeg_data --resize_shorter 256'),
    '/tmp/jpeg_sp': ('python -m mimjax.sam --config configs/sam.py:vit_b,superpixel --workdir '
                     '/tmp/jpeg_sp --config.source=image_folder '
                     '--config.source_data_dir=/tmp/jpeg_data'),
    'workdirs/mae_tiny.safetensors': ('python -m mimjax.convert --workdir workdirs/mae_tiny '
                                      '--format timm --out workdirs/mae_tiny.safetensors --verify'),
    'workdirs/mae_tiny_mae.pth': ('python -m mimjax.convert --workdir workdirs/mae_tiny --format '
                                  'mae --out workdirs/mae_tiny_mae.pth --verify'),
}


def doc_files() -> list[Path]:
  return ([REPO / 'README.md'] + sorted((REPO / 'configs').glob('*.py'))
          + sorted((REPO / 'configs' / 'eval').glob('*.py')) + sorted((REPO / 'docs').glob('*.md')))


_PYTHON = re.compile(r'^((?:[A-Z_]+=\S+\s+)*)(?:\.venv/bin/)?python\s+(-m\s+mimjax\.|-c\s)')


def _logical_lines(text: str) -> list[str]:
  """Lines with backslash continuations joined and whitespace runs collapsed."""
  out, cur = [], ''
  for line in text.splitlines():
    if line.rstrip().endswith('\\'):
      cur += line.rstrip()[:-1] + ' '
      continue
    out.append(' '.join((cur + line).split()))
    cur = ''
  return out


def _strip_comment(line: str) -> str:
  """The command without a trailing `# comment` (a `#` after a space, outside quotes)."""
  quote = None
  for i, ch in enumerate(line):
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch == '#' and (i == 0 or line[i - 1].isspace()):
      return line[:i].rstrip()
  return line


def commands_in(path: Path) -> list[str]:
  """The python commands a file documents, in order."""
  text = path.read_text()
  if path.suffix == '.py':
    blocks = [ast.get_docstring(ast.parse(text)) or '']
  else:
    blocks = [m.group(2) for m in re.finditer(r'^```(\w*)\n(.*?)^```', text, re.S | re.M)
              if m.group(1) in ('', 'bash', 'sh')]
  found = []
  for block in blocks:
    for line in _logical_lines(block):
      line = _strip_comment(line.strip())
      if _PYTHON.match(line):  # the interpreter is the test's own; `.venv/bin/` says no more
        found.append(re.sub(r'^((?:[A-Z_]+=\S+\s+)*)\.venv/bin/python', r'\1python', line))
  return found


def _match(rules: list, command: str) -> Optional[str]:
  return next((why for pattern, why in rules if re.search(pattern, command)), None)


def _reads(command: str) -> list[str]:
  """The PRODUCERS commands `command` depends on (not itself)."""
  return [p for key, p in PRODUCERS.items()
          if p != command and re.search(rf'(?<![\w/.]){re.escape(key)}(?![\w.])', command)]


def _slow(command: str) -> bool:
  return bool(_match(SLOW, command)) or any(_slow(p) for p in _reads(command))


@functools.cache
def collected() -> dict[str, list[str]]:
  """{repo-relative file: its commands} for every file documenting at least one."""
  out = {}
  for path in doc_files():
    found = commands_in(path)
    if found:
      out[str(path.relative_to(REPO))] = found
  return out


def runnable(commands: list[str]) -> list[str]:
  return [c for c in commands if not _match(SKIP, c)]


def default_command(commands: list[str]) -> Optional[str]:
  """A file's cheapest command: its first one that is neither skipped nor slow."""
  return next((c for c in runnable(commands) if not _slow(c)), None)


def _has_total_steps(command: str) -> bool:
  m = re.search(r'mimjax\.main --config (configs/\S+?)\.py(?::(\S+))?', command)
  if not m:
    return False
  module = importlib.import_module(m.group(1).replace('/', '.'))
  config = module.get_config(m.group(2)) if m.group(2) else module.get_config()
  return 'total_steps' in config


def as_run(command: str, root: str) -> str:
  """The command as the test runs it: this interpreter, paths under `root`, short runs."""
  m = _PYTHON.match(command)
  # Rewrite /tmp/ in the documented text only: the interpreter (and the repository) may
  # themselves live under /tmp (a CI clone), and must not be rewritten.
  rest = re.sub(r'(?<![\w.])/tmp/', root + '/', command[m.start(2):])
  env = re.sub(r'(?<![\w.])/tmp/', root + '/', m.group(1))
  run = env + shlex.quote(sys.executable) + ' ' + rest
  if _has_total_steps(command):
    run += f' --config.total_steps={STEPS}'
  if 'mimjax.bench' in command:
    run += ' --steps 1 --warmup 0'
  return run


class Runner:
  """Runs each command once (after the commands it reads from), in one temp dir."""

  def __init__(self, root: str):
    self.root, self.done = root, {}
    os.symlink(REPO / 'configs', os.path.join(root, 'configs'))
    self.env = subprocess_env(1, PYTHONPATH=str(REPO))  # one device, as a user's CPU run has

  def run(self, command: str) -> subprocess.CompletedProcess:
    if command not in self.done:
      for producer in _reads(command):
        result = self.run(producer)
        assert result.returncode == 0, f'prerequisite failed: {producer}'
      self.done[command] = subprocess.run(
          as_run(command, self.root), shell=True, cwd=self.root, env=self.env,
          capture_output=True, text=True, timeout=TIMEOUT_S)
    return self.done[command]


@pytest.fixture(scope='module')
def runner():
  with tempfile.TemporaryDirectory(prefix='mimjax_docs_') as root:
    yield Runner(root)


def check(runner: Runner, command: str) -> None:
  result = runner.run(command)
  assert result.returncode == 0, (f'documented command failed ({result.returncode}):\n'
                                  f'{command}\n--- stdout\n{result.stdout[-3000:]}\n'
                                  f'--- stderr\n{result.stderr[-3000:]}')
  if re.search(r'configs/eval/\w+\.py', command):  # every evaluation ends with its results
    assert 'results.json' in result.stdout, result.stdout[-2000:]


def test_collection_finds_the_documented_commands():
  found = collected()
  for name in ('README.md', 'configs/mae.py', 'configs/eval/knn.py', 'docs/sam.md',
               'docs/convert.md', 'docs/data.md'):
    assert name in found, sorted(found)
  assert ('python -m mimjax.main --config configs/mre_mae.py:tiny --workdir /tmp/mre_mae_tiny '
          '--config.data.name=photos --config.data.data_dir=/tmp/sp_tiny '
          '--config.batch_size=16') in found['configs/mre_mae.py']
  every = [c for cs in found.values() for c in cs]
  for pattern, why in SKIP + SLOW:
    assert any(re.search(pattern, c) for c in every), f'stale entry {pattern!r} ({why})'
  for producer in PRODUCERS.values():
    assert producer in every, f'PRODUCERS names an undocumented command: {producer}'


def test_every_file_has_a_default_command():
  missing = [f for f, cs in collected().items() if default_command(cs) is None]
  assert not missing, f'no cheap runnable command in {missing}: add one or list it in SKIP'


def test_as_run_rewrites_paths_and_shortens_training():
  cmd = 'MIMJAX_X=1 python -m mimjax.main --config configs/mae.py:tiny --workdir /tmp/mae_tiny'
  assert as_run(cmd, '/r') == (f'MIMJAX_X=1 {shlex.quote(sys.executable)} -m mimjax.main '
                               '--config configs/mae.py:tiny --workdir /r/mae_tiny '
                               f'--config.total_steps={STEPS}')
  knn = ('python -m mimjax.main --config configs/eval/knn.py:tiny --workdir /tmp/k '
         '--config.pretrained=workdirs/mae_tiny')
  assert not as_run(knn, '/r').endswith(f'--config.total_steps={STEPS}')  # no such key
  assert _reads(knn) == [PRODUCERS['workdirs/mae_tiny']]


# Every entry point from a directory that is neither the repository nor holds `configs`, with
# paths relative to it: a config relative to here (through the temp dir's `configs` link) or
# one found in the repository, workdirs and outputs relative to here. (entry point, args,
# what its output must say); the cheap ones run by default, the others with -m slow.
ELSEWHERE = [
    ('plan', '--config ../../configs/mae.py:tiny --devices 2', 'per device'),
    ('convert', '--workdir ../../workdirs/mae_tiny --format timm --out out/m.safetensors',
     'wrote out/m.safetensors'),
    ('sam', '--config configs/sam.py:tiny,superpixel --workdir sp', 'photos/1.0.0'),
    ('bench', '--config configs/mae.py:tiny --steps 1 --warmup 0', 'img_per_s'),
]
_SLOW_ELSEWHERE = ('bench',)  # compiles and times a train step: ~40 s on 2 loaded cores


@pytest.mark.parametrize('entry,args,says', [
    pytest.param(*e, marks=[pytest.mark.slow] if e[0] in _SLOW_ELSEWHERE else [])
    for e in ELSEWHERE])
def test_entry_points_run_from_another_directory(runner, entry, args, says):
  if 'workdirs/mae_tiny' in args:
    assert runner.run(PRODUCERS['workdirs/mae_tiny']).returncode == 0
  cwd = os.path.join(runner.root, 'elsewhere', entry)
  os.makedirs(cwd)
  result = subprocess.run(f'{shlex.quote(sys.executable)} -m mimjax.{entry} {args}', shell=True,
                          cwd=cwd, env=runner.env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
  assert result.returncode == 0, f'{entry} {args}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}'
  assert says in result.stdout + result.stderr
  stray = re.findall(r'^(?:INFO:|I\d{4} ).*', result.stdout + result.stderr, re.M)
  assert not stray, stray  # no library INFO lines (absl's or Python logging's)


def test_tiny_run_logging_to_a_file_prints_periodic_loss_lines(runner):
  """Off a terminal (nohup, a log file, CI) the README's main job is not silent: one plain
  line per log step with step, loss, img/s and ETA, and no progress-bar carriage returns."""
  log = os.path.join(runner.root, 'mae_tiny.log')
  command = (f'{shlex.quote(sys.executable)} -m mimjax.main --config configs/mae.py:tiny '
             '--workdir workdirs/logged --config.total_steps=4 --config.log_every=1 '
             f'> {log} 2>&1')
  assert subprocess.run(command, shell=True, cwd=runner.root, env=runner.env,
                        timeout=TIMEOUT_S).returncode == 0
  with open(log) as f:
    text = f.read()
  assert '\r' not in text
  lines = [l for l in text.splitlines() if re.match(r'mimjax: step \d/4 \(\d+%\), loss ', l)]
  assert [l.split()[2] for l in lines] == ['1/4', '2/4', '3/4', '4/4'], text
  assert all('img/s' in l for l in lines[1:]) and 'ETA' in lines[1], text


@pytest.mark.parametrize('name', sorted(collected()))
def test_cheapest_command_runs(runner, name):
  check(runner, default_command(collected()[name]))


_DEFAULTS = {default_command(cs) for cs in collected().values()}
_REST = list(dict.fromkeys(c for cs in collected().values() for c in runnable(cs)
                           if c not in _DEFAULTS))


@pytest.mark.slow
@pytest.mark.parametrize('command', _REST)
def test_documented_command_runs(runner, command):
  check(runner, command)
