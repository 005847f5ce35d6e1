"""Command-line plumbing shared by every entry point (main, plan, bench, sam, convert,
data.build): config paths that work from any directory, one-line flag errors, `--help` that
exits 0.

absl programs: `cli.run_absl(main, 'mimjax.plan')` in place of `app.run(main)`.
argparse programs: `cli.ArgumentParser(prog=...)` in place of `argparse.ArgumentParser`.
"""

import argparse
import ast
import functools
import os
import re
import sys
from typing import Callable, NoReturn, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HELP = ('-h', '--help', '-?', '--helpshort', '--helpfull')


def _config_arg_index(argv: Sequence[str]) -> int:
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      return i + 1
    if arg.startswith('--config='):
      return i
  return -1


def fail(prog: str, message: str) -> NoReturn:
  """The one error line every entry point prints for bad input; exit status 2."""
  print(f'{prog}: error: {message}', file=sys.stderr)
  sys.exit(2)


def prepare_argv(argv: list, prog: str = 'mimjax') -> None:
  """Makes `--config configs/X.py` work wherever the user stands: a relative path that does not
  exist here is taken relative to the repository, and the directory holding the `configs`
  package goes on sys.path (config files import `configs.common`). Edits `argv` in place."""
  if any(a in _HELP for a in argv[1:]):
    return  # help needs no config file
  i = _config_arg_index(argv)
  if i < 0:
    return
  prefix = '--config=' if argv[i].startswith('--config=') else ''
  path, sep, arg = argv[i][len(prefix):].partition(':')
  path = os.path.expanduser(path)
  if not os.path.exists(path) and not os.path.isabs(path) and \
      os.path.exists(os.path.join(REPO, path)):
    path = os.path.join(REPO, path)
    argv[i] = f'{prefix}{path}{sep}{arg}'
  if not os.path.isfile(path):
    fail(prog, f'--config {path}: no such file (expected a config file such as '
               f'configs/mae.py, relative to here or to {REPO})')
  package_dir = os.path.dirname(os.path.abspath(path))
  while os.path.exists(os.path.join(package_dir, '__init__.py')):
    package_dir = os.path.dirname(package_dir)
  for d in (REPO, package_dir):
    if d not in sys.path:
      sys.path.insert(0, d)


def default_row_hint(argv: Sequence[str]) -> str:
  """'' unless `--config` names a file without `:ROW`: then which row its get_config picked
  (the paper row, whose data set a newcomer lacks) and the `:tiny` row that runs anywhere."""
  i = _config_arg_index(argv)
  if i < 0:
    return ''
  path, sep, _ = argv[i].removeprefix('--config=').partition(':')
  if sep or not os.path.isfile(path):
    return ''
  with open(path) as f:
    tree = ast.parse(f.read())
  row = next((fn.args.defaults[-1].value for fn in tree.body
              if isinstance(fn, ast.FunctionDef) and fn.name == 'get_config' and fn.args.defaults
              and isinstance(fn.args.defaults[-1], ast.Constant)), None)
  if row is None:
    return ''
  shown = os.path.relpath(path, REPO) if os.path.abspath(path).startswith(REPO + os.sep) else path
  return (f'. --config {shown} without :ROW is its paper row {shown}:{row}; for the laptop '
          f'smoke test on the embedded data use --config {shown}:tiny')


def flag_error(e: BaseException) -> str:
  """absl/ml_collections flag errors (often a traceback in a string) → one line."""
  text = str(e)
  if isinstance(e, (AttributeError, KeyError)):  # unknown --config.key (ml_collections)
    key = re.search(r'[A-Za-z_][\w]*', text)
    key = key.group(0) if key else text
    given = [a.split('=', 1)[0] for a in sys.argv
             if re.match(rf'--config\.([\w.]*\.)?{re.escape(key)}(=|$)', a)]
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return (f'{given[0] if given else "--config." + key}: no such config key'
            + (f'; did you mean {hint.group(1)}?' if hint else ''))
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if 'Traceback' in text and lines:  # a config file's own error: keep its last line
    return f'--config: {lines[-1]}'
  errno = next((l for l in lines if l.startswith('[Errno')), None)
  if errno:
    return f'--config: {errno}'
  return lines[0] if lines else type(e).__name__


def _print_help(argv: Sequence[str]) -> NoReturn:
  from absl import app
  app.usage(shorthelp='--helpfull' not in argv, writeto_stdout=True)
  sys.exit(0)


def parse_flags(argv: list, prog: str = 'mimjax') -> list:
  """absl's parser, with one-line errors instead of a FATAL traceback, and `--help` on stdout
  with exit status 0 (absl's own exits 1)."""
  from absl import flags
  if any(a in _HELP for a in argv[1:]):
    _print_help(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = flag_error(e.__context__ or e) if 'Traceback' in str(e) else flag_error(e)
  except Exception as e:  # pylint: disable=broad-except  (config files and their overrides)
    message = flag_error(e)
  fail(prog, message)


def config_value(config_flag, prog: str = 'mimjax'):
  """The value of a `config_flags.DEFINE_config_file` flag (loaded lazily, on first access);
  a config file's error is one line."""
  try:
    return config_flag.value
  except Exception as e:  # pylint: disable=broad-except
    fail(prog, flag_error(e))


def run_absl(main: Callable[[list], None], prog: str) -> None:
  """`app.run(main)` with config paths from anywhere, one-line flag errors and `--help` → 0."""
  from absl import app
  prepare_argv(sys.argv, prog)
  app.run(main, flags_parser=functools.partial(parse_flags, prog=prog))


class ArgumentParser(argparse.ArgumentParser):
  """argparse with one error line (`prog: error: ...`, exit 2) instead of usage + error."""

  def error(self, message: str) -> NoReturn:
    fail(self.prog.removeprefix('python -m '), f'{message} (--help lists the flags)')
