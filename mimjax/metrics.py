"""Metric logging: W/metrics.jsonl and TensorBoard events."""

import json
import math
import sys
from typing import Optional

import jax
import numpy as np
from etils import epath

from mimjax import workdir as workdir_lib


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX's writer module imports torch when it is installed (the README's set-up has
  it) only so it can accept torch tensors; mimjax writes floats, and the import cost ~5 s of
  every training start on 2 cores. Unless torch is already loaded, the import sees torch as
  absent (a None entry in sys.modules makes `import torch` raise ImportError), then the entry
  is removed so a later `import torch` works as usual.
  """
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter  # clu's writers need TensorFlow
    return SummaryWriter
  sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


def _scalar(v) -> float:
  v = float(np.asarray(v))
  return v if math.isfinite(v) else str(v)  # JSON has no NaN; keep it readable


def _record(line: bytes) -> Optional[dict]:
  """One metrics.jsonl line as a record with an int step, or None if it is not one."""
  try:
    record = json.loads(line.decode())
  except (ValueError, UnicodeDecodeError):
    return None
  ok = isinstance(record, dict) and isinstance(record.get('step', 0), int)
  return record if ok else None


class MetricWriter:
  """Writes one JSON object per log step (process 0 only) and mirrors it to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self._tb_dir = str(epath.Path(workdir) / 'tensorboard')
    self._tb = None  # opened at the first record: a run with nothing to log adds no event file

  def truncate_after(self, step: int) -> None:
    """On resume: drop records logged after the restored checkpoint (they will be redone).
    The file is a log: lines that are not JSON records (a tail cut short by a crash or a full
    disk, stray bytes) are dropped too, with one warning line."""
    if not (self.enabled and self.path.exists()):
      return
    keep, damaged = [], 0
    for line in self.path.read_bytes().split(b'\n'):
      if not line.strip():
        continue
      record = _record(line)
      if record is None:
        damaged += 1
      elif record.get('step', 0) <= step:
        keep.append(line.decode())
    if damaged:
      print(f'mimjax: warning: {self.path}: dropped {damaged} damaged line(s) (not a JSON '
            f'record: cut short or stray bytes); kept {len(keep)} record(s)', file=sys.stderr,
            flush=True)
    workdir_lib.atomic_write(str(self.path), ''.join(line + '\n' for line in keep))

  def write(self, step: int, metrics: dict) -> dict:
    record = {'step': int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    if self.enabled:
      if self._tb is None:
        self._tb = _summary_writer_class()(self._tb_dir)
      with self.path.open('a') as f:
        f.write(json.dumps(record) + '\n')
      for k, v in record.items():
        if k != 'step' and isinstance(v, float):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    return record

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
