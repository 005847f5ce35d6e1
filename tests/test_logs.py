"""The shared console helpers: the results table and the library-noise filter."""

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


def test_quiet_library_logs_drops_known_noise_only():
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
    logging.warning('Metadata file does not exist: /w/checkpoints/3/_CHECKPOINT_METADATA')
    logging.warning('OpenCV is not installed. We recommend using OpenCV')
    logging.warning('a real problem')
    logging.info('an info line')  # below the WARNING verbosity set by the helper
  finally:
    absl_logger.removeHandler(handler)
    logging.set_verbosity(old_verbosity)
  assert seen == ['a real problem']


def test_orbax_errors_it_also_raises_are_dropped_other_errors_kept():
  """Issue 28.5: each failed background write of a checkpoint was logged with its traceback
  (300+ lines on a full disk) before the same error reached mimjax's one-line report."""
  logs.quiet_library_logs(tfds_progress=True)
  seen = []

  class Keep(py_logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  handler = Keep()
  absl_logger = logging.get_absl_logger()
  absl_logger.addHandler(handler)
  try:
    for path, message in [('/v/orbax/checkpoint/_src/futures/future.py', 'write failed'),
                          ('/v/jax/_src/compiler.py', 'a real error')]:
      absl_logger.handle(absl_logger.makeRecord('absl', py_logging.ERROR, path, 1, message,
                                                None, None))
  finally:
    absl_logger.removeHandler(handler)
  assert seen == ['a real error']
