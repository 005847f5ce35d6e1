"""Console output shared by the entry points: quiet library logs, progress that is never
silent (a bar on a terminal, plain lines in a log file), and the table of results."""

import logging as py_logging
import os
import sys
import time
from typing import Callable, Iterable, Mapping, Optional, TextIO

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


def format_duration(seconds: float) -> str:
  """3725 → '1h02m', 95 → '1m35s', 7.2 → '7s'."""
  s = int(round(max(seconds, 0.0)))
  if s >= 3600:
    return f'{s // 3600}h{s % 3600 // 60:02d}m'
  return f'{s // 60}m{s % 60:02d}s' if s >= 60 else f'{s}s'


class Progress:
  """Progress of a long loop on stderr, never silent: a tqdm bar on a terminal; elsewhere (a log
  file, nohup, CI, a pod's log collector, where a bar's carriage returns are noise) one plain
  line at every `every`-th unit that carries values (`set_postfix`), and after `interval_s`
  seconds without a line, e.g.
  `mimjax: step 40/300 (13%), loss 0.7443, 536 img/s, ETA 35s`.
  Rates count from the first update (a first step's compilation is not a rate);
  `per_unit` scales them (images per step)."""

  def __init__(self, total: Optional[int], initial: int = 0, *, prog: str = 'mimjax', label: str = 'step',
               rate_unit: str = 'img', per_unit: float = 1.0, every: Optional[int] = None,
               interval_s: float = 30.0, enabled: bool = True, terminal: Optional[bool] = None,
               out: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic):
    self.out = out or sys.stderr
    self.total, self.n, self.label, self.prog = total, initial, label, prog
    self.rate_unit, self.per_unit, self.every, self.interval_s = rate_unit, per_unit, every, interval_s
    self.enabled, self.clock, self.postfix = enabled, clock, {}
    terminal = self.out.isatty() if terminal is None else terminal
    self.bar = None
    if enabled and terminal:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, file=self.out, dynamic_ncols=True,
                      unit=rate_unit if per_unit == 1 else label)
    self.last_line_t = clock()   # when the last line was printed (or the loop started)
    self.last_line_n = initial
    self.ref = None              # (n, t) the rate counts from: the first update

  def update(self, n: int = 1) -> None:
    """Advances by `n` units; a plain line once `interval_s` passed without one."""
    self.n += n
    if self.bar is not None:
      self.bar.update(n)
      return
    now = self.clock()
    if self.ref is None:
      self.ref = (self.n, now)
    if self.enabled and now - self.last_line_t >= self.interval_s:
      self.line(now)

  def set_postfix(self, **values) -> None:
    """Shows `values` (e.g. loss); in plain mode a line when this unit is an `every`-th one."""
    self.postfix.update(values)
    if self.bar is not None:
      self.bar.set_postfix(**values)
    elif self.enabled and self.every and self.n % self.every == 0 and self.n != self.last_line_n:
      self.line(self.clock())

  def line(self, now: Optional[float] = None) -> None:
    """Prints one plain progress line now."""
    now = self.clock() if now is None else now
    parts = [f'{self.label} {self.n}' if not self.total else
             f'{self.label} {self.n}/{self.total} ({100 * self.n // self.total}%)']
    parts += [f'{k} {v}' for k, v in self.postfix.items()]
    if self.ref is not None and self.n > self.ref[0] and now > self.ref[1]:
      per_s = (self.n - self.ref[0]) / (now - self.ref[1])
      parts.append(f'{per_s * self.per_unit:.4g} {self.rate_unit}/s')
      if self.total and self.n < self.total:
        parts.append(f'ETA {format_duration((self.total - self.n) / per_s)}')
    print(f'{self.prog}: ' + ', '.join(parts), file=self.out, flush=True)
    self.last_line_t, self.last_line_n = now, self.n

  def close(self) -> None:
    """Ends the bar; in plain mode a last line if units passed since the previous one."""
    if self.bar is not None:
      self.bar.close()
    elif self.enabled and self.n != self.last_line_n:
      self.line()
    self.enabled = False  # closing twice prints nothing more

  def __enter__(self) -> 'Progress':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
