"""`python -m mimjax.sam --config configs/sam.py:ARG --workdir W [--config.key=value]`."""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from mimjax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/sam.py:ARG', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output: W/NAME/1.0.0 (TFDS) + W/.sam_work/.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from mimjax import logs
  logs.quiet_library_logs()  # our one progress bar, not tfds's nested ones
  from mimjax.data.builders.tfds_io import BuildError
  from mimjax.sam import run, sources
  try:
    path = run.run(cli.config_value(_CONFIG, 'mimjax.sam'), _WORKDIR.value)
  except (ValueError, FileNotFoundError, BuildError, sources.CheckpointError) as e:
    hint = cli.default_row_hint(sys.argv) if isinstance(e, FileNotFoundError) else ''
    cli.fail('mimjax.sam', f'{e}{hint}')
  if path is None:
    sys.exit(0)


if __name__ == '__main__':
  cli.run_absl(main, 'mimjax.sam')
