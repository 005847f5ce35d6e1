"""Console output shared by the entry points: quiet library logs, and the table of results."""

import logging as py_logging
import os
import sys
from typing import Iterable, Mapping, Optional, TextIO

# Harmless lines libraries print on every run (matched as substrings of the message):
KNOWN_NOISE = (
    'OpenCV is not installed',       # tfds: we decode with PIL on purpose
    'Metadata file does not exist',  # orbax: a composite checkpoint's item dir has none of its own
    'Unable to initialize backend',  # jax probing for a TPU/GPU the host does not have
)


class _DropKnownNoise(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    return not any(n in record.getMessage() for n in KNOWN_NOISE)


class _DropReportedErrors(py_logging.Filter):
  """orbax logs every failed background write with its traceback (a full disk: 300+ lines)
  and then raises the same error to its caller, which mimjax reports in one line."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not (record.levelno >= py_logging.ERROR and
                f'{os.sep}orbax{os.sep}checkpoint{os.sep}' in (record.pathname or ''))


_NOISE_FILTER = _DropKnownNoise()
_REPORTED_FILTER = _DropReportedErrors()


def quiet_library_logs(tfds_progress: bool = False) -> None:
  """Library INFO lines off unless `--verbosity` was given (they drown the progress bar and
  the results), KNOWN_NOISE dropped; `tfds_progress=False` also turns off tfds's nested
  per-split progress bars (the caller shows its own)."""
  from absl import flags
  from absl import logging
  verbosity_given = flags.FLAGS.is_parsed() and flags.FLAGS['verbosity'].present
  if not verbosity_given:
    logging.set_verbosity(logging.WARNING)
  # A logger's filter only sees records logged on it, a handler's sees propagated ones too.
  for target in (logging.get_absl_logger(), logging.get_absl_handler(),
                 *py_logging.getLogger().handlers, py_logging.getLogger('jax._src.xla_bridge')):
    target.addFilter(_NOISE_FILTER)  # the same object: adding it twice is a no-op
    target.addFilter(_REPORTED_FILTER)
  if not tfds_progress:
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()


def _format_value(value) -> str:
  if isinstance(value, float) or hasattr(value, 'dtype'):  # numpy scalars too
    return f'{float(value):.4g}'
  return str(value)


def results_table(results: Mapping[str, object], title: str = 'results') -> str:
  """Two aligned columns, one `name  value` row per result (sorted by name)."""
  rows = [(str(k), _format_value(v)) for k, v in sorted(results.items())]
  width = max((len(k) for k, _ in rows), default=0)
  lines = [title, '-' * (width + 2 + max((len(v) for _, v in rows), default=0))]
  lines += [f'{k:<{width}}  {v}' for k, v in rows]
  return '\n'.join(lines)


def print_results(results: Mapping[str, object], files: Iterable[str] = (),
                  title: str = 'results', out: Optional[TextIO] = None) -> None:
  """Prints the results table, then one `wrote PATH` line per file (results.json, plots)."""
  out = out or sys.stdout
  if results:
    print(results_table(results, title), file=out)
  for path in files:
    print(f'wrote {path}', file=out)
  out.flush()


def say(message: str) -> None:
  """One status line on stderr (process 0), independent of absl's log verbosity."""
  import jax  # noqa: PLC0415  (jax only when a status line is printed)
  if jax.process_index() == 0:
    print(f'mimjax: {message}', file=sys.stderr, flush=True)
