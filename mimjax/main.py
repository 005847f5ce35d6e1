"""Entry point: `python -m mimjax.main --config configs/X.py:ARG --workdir W [--config.k=v]`."""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mimjax import logs
from mimjax.train import durations
from mimjax.train import validate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/X.py:ARG', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, logs.')
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


def run(config, workdir: str):
  """Validates the config, then trains (or evaluates, for configs/eval/*)."""
  if config.get('mode') == 'evaluate':  # no training: run config.evals once (knn, analysis)
    from mimjax.evaluate import run as evaluate_run
    return evaluate_run.evaluate(config, workdir)
  validate.validate_config(config)
  from mimjax.train import trainer
  return trainer.train_and_evaluate(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_logs()
  maybe_initialize_distributed()
  try:
    config = _CONFIG.value
    with config.unlocked():
      durations.apply_cli_overrides(config, sys.argv)
    run(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    logging.flush()
    print(f'mimjax: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
