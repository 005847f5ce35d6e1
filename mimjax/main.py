"""Entry point: `python -m mimjax.main --config configs/X.py:ARG --workdir W [--config.k=v]`.

Every user error (bad flag, config key or value, workdir, checkpoint) is one line
`mimjax: error: ...` and exit status 2. `--allow_config_change` resumes a workdir with a config
that differs in more than durations, cadences, data paths and layout (see docs/training.md).
JAX's persistent compilation cache lives in $MIMJAX_COMPILATION_CACHE (default
$XDG_CACHE_HOME/mimjax/jax, i.e. ~/.cache/mimjax/jax; `MIMJAX_COMPILATION_CACHE=off` disables it).
"""

import errno
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mimjax import cli
from mimjax import distributed
from mimjax import durations
from mimjax import logs
from mimjax import validate
from mimjax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/X.py:ARG', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, logs.')
_ALLOW_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Resume a workdir although the config differs from the one '
    'it was trained with (the new config is recorded in config.json and history.jsonl).')
flags.mark_flags_as_required(['config', 'workdir'])


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache (re-runs and resumes skip XLA compilation);
  returns its directory, or None when disabled (MIMJAX_COMPILATION_CACHE=off)."""
  import jax
  value = os.environ.get('MIMJAX_COMPILATION_CACHE')
  if value is not None and value.strip().lower() in ('', '0', 'off', 'false', 'none'):
    return None
  if value is None and jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR
    return jax.config.jax_compilation_cache_dir
  cache_home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  path = os.path.expanduser(value) if value else os.path.join(cache_home, 'mimjax', 'jax')
  jax.config.update('jax_compilation_cache_dir', path)
  # Cache every program that took noticeably long to compile, not only those > 1 s (JAX's
  # default): the train step of a small model compiles in well under a second per program.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
  return path


def check_eval_rerun(config, workdir: str, allow_change: bool) -> None:
  """An evaluation workdir re-run on another pretrained model would mix two models' results."""
  if allow_change or not os.path.exists(os.path.join(workdir, 'config.json')):
    return
  from mimjax import checkpoint  # orbax: only for a re-run
  old = checkpoint.read_config_json(workdir).get('pretrained')
  norm = lambda p: os.path.abspath(os.path.expanduser(p)) if p and '://' not in p else p
  if norm(old) != norm(config.get('pretrained')):
    raise ValueError(f'{workdir} holds an evaluation of pretrained={old!r}, not '
                     f'{config.get("pretrained")!r}; {workdir_lib.OVERRIDE_HINT}')


def run(config, workdir: str, allow_config_change: bool = False):
  """Validates the config, then trains (or evaluates, for configs/eval/*)."""
  workdir_lib.check_output_dir(workdir)
  if config.get('mode') == 'evaluate':  # no training: run config.evals once (knn, analysis)
    from mimjax.evaluate import run as evaluate_run
    check_eval_rerun(config, workdir, allow_config_change)
    return evaluate_run.evaluate(config, workdir)
  validate.validate_config(config)
  from mimjax.train import trainer
  return trainer.train_and_evaluate(config, workdir, allow_config_change=allow_config_change)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_logs()
  config = cli.config_value(_CONFIG)
  peers = None
  try:
    distributed.maybe_initialize_distributed()
    peers = distributed.watch_peers(on_lost=lambda message: _exit(message, 1))
    enable_compilation_cache()
    with config.unlocked():
      durations.apply_cli_overrides(config, sys.argv)
    run(config, _WORKDIR.value, _ALLOW_CHANGE.value)
    if peers is not None:
      peers.stop()
  except (ValueError, OSError, FloatingPointError, workdir_lib.WorkdirLockedError) as e:
    hint = cli.default_row_hint(sys.argv) if isinstance(e, FileNotFoundError) else ''
    _exit(f'mimjax: error: {_one_line(e, _WORKDIR.value)}{hint}', 2)
  except KeyboardInterrupt:  # start-up, or a second Ctrl-C (the first one saves and exits)
    _exit(f'mimjax: interrupted; {_interrupted_state(_WORKDIR.value)}', 130)
  except Exception as e:  # pylint: disable=broad-except  (JAX's runtime errors have no API type)
    message = out_of_memory_message(e, config)
    if message is None:
      if peers is not None:
        peers.settle()  # exits with one line if a peer is gone
      raise
    _exit(f'mimjax: error: {message}', 2)


def out_of_memory_message(e: BaseException, config) -> str | None:
  """One line for an XLA out-of-memory error (what was asked for, and the knobs that lower
  it), or None if `e` is something else."""
  text = str(e)
  if 'Out of memory' not in text and not ('RESOURCE_EXHAUSTED' in text and 'memory' in text):
    return None
  size = re.search(r'allocat\w* (\d+) bytes', text)
  asked = f' allocating {int(size.group(1)) / 2 ** 30:.1f} GiB' if size else ''
  accum = config.get('grad_accum', 1)
  return (f'out of memory{asked} (config.batch_size={config.get("batch_size")}, '
          f'grad_accum={accum}); lower --config.batch_size, split it into micro-batches with '
          f'--config.grad_accum={2 * accum}, or use --config.model.remat=True or '
          '--config.model.dtype=bfloat16')


def _one_line(e: BaseException, workdir: str) -> str:
  """An error as one line; an OSError names its file, or the workdir being written
  (`[Errno 28] No space left on device` alone does not say where)."""
  if isinstance(e, OSError) and e.strerror and (e.filename or e.errno == errno.ENOSPC):
    hint = '; free space there or use another --workdir' if e.errno == errno.ENOSPC else ''
    return f'{e.filename or os.path.abspath(workdir)}: {e.strerror}{hint}'
  return ' '.join(str(e).split('\n')) or type(e).__name__


def _exit(message: str, status: int) -> None:
  """Prints the one line and exits now: the `with` blocks have already closed the workdir
  (checkpoint waited for, lock released, logs flushed), and library threads still alive after a
  failure (data workers, TensorStore callbacks) or atexit hooks of half-written files
  (tensorboardX on a full disk) would otherwise keep the process up or print tracebacks."""
  logging.flush()
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)  # pylint: disable=protected-access


def _interrupted_state(workdir: str) -> str:
  """What an interrupted run left: the checkpoint a re-run resumes from, or nothing."""
  from mimjax import checkpoint  # orbax: only once interrupted
  try:
    steps = checkpoint.saved_steps(workdir) if workdir and workdir.strip() else []
  except OSError:
    steps = []
  if steps:
    return (f'checkpoint {steps[-1]} in {checkpoint.resolve(workdir)}/checkpoints is intact; '
            're-run the same command to resume from it')
  return 'nothing saved yet; re-run the same command to start again'


if __name__ == '__main__':
  cli.run_absl(main, 'mimjax')
