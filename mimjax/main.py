"""Entry point: `python -m mimjax.main --config configs/X.py:ARG --workdir W [--config.k=v]`.

Every user error (bad flag, config key or value, workdir, checkpoint) is one line
`mimjax: error: ...` and exit status 2. `--allow_config_change` resumes a workdir with a config
that differs in more than durations, cadences, data paths and layout (see docs/training.md).
JAX's persistent compilation cache lives in $MIMJAX_COMPILATION_CACHE (default
$XDG_CACHE_HOME/mimjax/jax, i.e. ~/.cache/mimjax/jax; `MIMJAX_COMPILATION_CACHE=off` disables it).
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mimjax import cli
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


def maybe_initialize_distributed() -> None:
  """Multi-host: `jax.distributed.initialize()` under SLURM, multi-host TPU or when asked."""
  import jax
  env = os.environ
  multi_slurm = int(env.get('SLURM_NTASKS', '1')) > 1
  multi_tpu = ',' in env.get('TPU_WORKER_HOSTNAMES', '')
  if env.get('MIMJAX_DISTRIBUTED') == '1' or multi_slurm or multi_tpu:
    kwargs = {}
    if env.get('MIMJAX_COORDINATOR'):  # explicit (e.g. local multi-process tests)
      kwargs = dict(coordinator_address=env['MIMJAX_COORDINATOR'],
                    num_processes=int(env['MIMJAX_NUM_PROCESSES']),
                    process_id=int(env['MIMJAX_PROCESS_ID']))
    jax.distributed.initialize(**kwargs)


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
  path = os.path.join(workdir, 'config.json')
  if allow_change or not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f).get('pretrained')
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
  try:
    maybe_initialize_distributed()
    enable_compilation_cache()
    with config.unlocked():
      durations.apply_cli_overrides(config, sys.argv)
    run(config, _WORKDIR.value, _ALLOW_CHANGE.value)
  except (ValueError, OSError, FloatingPointError, workdir_lib.WorkdirLockedError) as e:
    logging.flush()
    hint = cli.default_row_hint(sys.argv) if isinstance(e, FileNotFoundError) else ''
    cli.fail('mimjax', f'{e}{hint}')
  except KeyboardInterrupt:  # during start-up; in the training loop Ctrl-C saves and exits
    print('mimjax: interrupted (nothing to save yet); re-run the same command to start again',
          file=sys.stderr)
    sys.exit(130)


if __name__ == '__main__':
  cli.run_absl(main, 'mimjax')
