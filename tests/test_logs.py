"""The shared console helpers: the results table, the library-noise filter, progress lines."""

import contextlib
import io
import logging as py_logging

import numpy as np
from absl import logging

from mimjax import logs


def test_results_table_aligns_sorted_rows_with_4_significant_digits():
  table = logs.results_table({'knn/top1': 0.87654321, 'eval/top5': np.float32(1.0),
                              'knn/top1@10%': 0.5}, title='evaluation')
  assert table.splitlines() == [
      'evaluation',
      '-' * (len('knn/top1@10%') + 2 + len('0.8765')),
      'eval/top5     1',
      'knn/top1      0.8765',
      'knn/top1@10%  0.5',
  ]


def test_print_results_ends_with_the_files_written():
  out = io.StringIO()
  logs.print_results({'eval/top1': 0.25}, ['/w/results.json', '/w/plots/aad.png'], out=out)
  lines = out.getvalue().splitlines()
  assert lines[0] == 'results'
  assert lines[2] == 'eval/top1  0.25'
  assert lines[3:] == ['wrote /w/results.json', 'wrote /w/plots/aad.png']


@contextlib.contextmanager
def _absl_messages_after_quieting():
  """The messages that reach the absl logger's handlers once `quiet_library_logs` ran."""
  old_verbosity = logging.get_verbosity()
  logs.quiet_library_logs(tfds_progress=True)
  seen = []

  class Keep(py_logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  handler = Keep()
  absl_logger = logging.get_absl_logger()
  absl_logger.addHandler(handler)
  try:
    yield seen
  finally:
    absl_logger.removeHandler(handler)
    logging.set_verbosity(old_verbosity)


def test_quiet_library_logs_drops_known_noise_only():
  with _absl_messages_after_quieting() as seen:
    logging.warning('Metadata file does not exist: /w/checkpoints/3/_CHECKPOINT_METADATA')
    logging.warning('OpenCV is not installed. We recommend using OpenCV')
    logging.warning('a real problem')
    logging.info('an info line')  # below the WARNING verbosity set by the helper
  assert seen == ['a real problem']


def test_orbax_errors_it_also_raises_are_dropped_other_errors_kept():
  """Issue 28.5: each failed background write of a checkpoint was logged with its traceback
  (300+ lines on a full disk) before the same error reached mimjax's one-line report."""
  with _absl_messages_after_quieting() as seen:
    absl_logger = logging.get_absl_logger()
    for path, message in [('/v/orbax/checkpoint/_src/futures/future.py', 'write failed'),
                          ('/v/jax/_src/compiler.py', 'a real error')]:
      absl_logger.handle(absl_logger.makeRecord('absl', py_logging.ERROR, path, 1, message,
                                                None, None))
  assert seen == ['a real error']


class _Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_progress_off_a_terminal_prints_plain_lines_at_log_steps_and_every_interval():
  out, clock = io.StringIO(), _Clock()
  bar = logs.Progress(100, 0, per_unit=64, every=10, interval_s=30, terminal=False, out=out,
                      clock=clock)
  clock.t = 20.0
  bar.update(1)               # step 1 (compilation): the rate counts from here
  for _ in range(9):
    clock.t += 0.5
    bar.update(1)
  bar.set_postfix(loss='0.5')  # step 10, a log step: 9 steps of 64 images in 4.5 s
  clock.t += 31
  bar.update(1)                # 31 s without a line: one more, with the last loss
  bar.update(1)                # no line: 0 s since the last
  bar.set_postfix(loss='0.4')  # step 12 is not a log step
  bar.close()                  # the last step's line
  bar.close()
  lines = out.getvalue().splitlines()
  assert lines == [
      'mimjax: step 10/100 (10%), loss 0.5, 128 img/s, ETA 45s',
      # 10 steps in 35.5 s since step 1: 0.2817 steps/s, 89 steps to go → 316 s
      'mimjax: step 11/100 (11%), loss 0.5, 18.03 img/s, ETA 5m16s',
      'mimjax: step 12/100 (12%), loss 0.4, 19.83 img/s, ETA 4m44s',  # 11 steps in 35.5 s
  ]
  assert '\r' not in out.getvalue()


def test_progress_without_total_or_when_disabled():
  out, clock = io.StringIO(), _Clock()
  bar = logs.Progress(None, prog='mimjax.data.build', label='train: images', rate_unit='img',
                      terminal=False, out=out, clock=clock)
  bar.update(1)
  clock.t = 2.0
  bar.update(4)
  bar.close()
  assert out.getvalue() == 'mimjax.data.build: train: images 5, 2 img/s\n'
  quiet = logs.Progress(10, terminal=False, out=out, enabled=False, clock=clock, interval_s=0)
  quiet.update(10)
  quiet.close()
  assert out.getvalue().count('\n') == 1


def test_format_duration():
  assert [logs.format_duration(s) for s in (7.2, 95, 3725)] == ['7s', '1m35s', '1h02m']
