"""Workdir safety shared by every entry point: atomic publishes, a run lock, stale temp files.

- `atomic_write`: temp file in the same directory + fsync + `os.replace`, so a reader (or a
  re-run after kill -9) sees the old file or the new one, never a partial one, and an existing
  destination is replaced (POSIX rename semantics on every platform).
- `WorkdirLock`: W/.lock held with a POSIX `lockf` lock while a trainer runs. The kernel drops
  the lock when the process dies (kill -9 included), so a killed run never wedges the workdir;
  the file's text (pid, host) only serves the error message. `lockf` locks are not inherited by
  forked data workers, and work across hosts on NFS (lockd).
- `remove_stale_temp`: temp entries named with `temp_name` whose process is gone.
"""

import fcntl
import json
import os
import socket
import time
import uuid
from typing import Callable, Optional, Union

_HOST = socket.gethostname()


def check_output_dir(path: str, flag: str = '--workdir') -> None:
  """One clear error when an output directory path is empty (it would mean the current
  directory: a run would write into a repository clone) or names something that is not a
  directory."""
  if not os.fspath(path).strip():
    raise ValueError(f'{flag} is empty; expected a directory path (new or from an earlier run), '
                     f'e.g. {flag} workdirs/run1')
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'{flag} {path}: exists and is not a directory; expected a '
                          'directory (new or from an earlier run)')


def check_writable(path: str, flag: str = '--workdir') -> None:
  """Fails with one line if `path` (or its nearest existing parent) cannot be written."""
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.access(probe, os.W_OK | os.X_OK):
    raise PermissionError(f'{flag} {path}: {probe} is not writable')


def check_output_file(path: str, flag: str = '--out') -> None:
  """One clear error when an output file path is empty, a directory, under a file, or not
  writable (instead of IsADirectoryError / FileExistsError tracebacks after the work)."""
  if not os.fspath(path).strip():
    raise ValueError(f'{flag} is empty; expected a file name')
  if os.path.isdir(path):
    raise ValueError(f'{flag} {path}: is a directory; expected a file name (e.g. '
                     f'{os.path.join(path, "model.safetensors")})')
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f'{flag} {path}: {parent} is a file, not a directory; choose another path')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f'{flag} {path}: {parent} is not writable')


def file_mode() -> int:
  """The mode `open()` gives a new file (0o666 less the umask): for files written via a
  mkstemp temp file, which is 0600."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def temp_name(path: str) -> str:
  """A sibling temp name that records host and pid (so a later run can tell it is stale)."""
  directory, base = os.path.split(path)
  return os.path.join(directory, f'.{base}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:6]}')


def atomic_write(path: str, data: Union[str, bytes, Callable]) -> None:
  """Publishes `path` atomically: str/bytes, or `data(file)` writing to a binary file object."""
  tmp = temp_name(path)
  try:
    with open(tmp, 'wb') as f:
      if callable(data):
        data(f)
      else:
        f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def pid_alive(pid: int) -> bool:
  """Whether a process with this pid exists on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def is_stale_temp(name: str, max_age_s: Optional[float] = None, path: Optional[str] = None) -> bool:
  """True for a `temp_name`-style entry written by a dead process on this host (or, given
  `max_age_s`, untouched for that long: another host's leftovers cannot be probed)."""
  parts = name.split('.tmp-', 1)[-1].split('-')
  if len(parts) >= 3 and parts[-2].isdigit():
    host, pid = '-'.join(parts[:-2]), int(parts[-2])
    if host == _HOST:
      return not pid_alive(pid)
  if max_age_s is not None and path is not None:
    try:
      return time.time() - os.path.getmtime(path) > max_age_s
    except FileNotFoundError:
      return False
  return False


def remove_stale_temp(directory: str, prefix: str = '.',
                      max_age_s: Optional[float] = None) -> list:
  """Deletes temp files/dirs in `directory` (names `prefix`...`.tmp-`...) left by dead runs."""
  import shutil
  removed = []
  if not os.path.isdir(directory):
    return removed
  for name in os.listdir(directory):
    full = os.path.join(directory, name)
    if name.startswith(prefix) and '.tmp-' in name and is_stale_temp(name, max_age_s, full):
      if os.path.isdir(full):
        shutil.rmtree(full, ignore_errors=True)
      else:
        try:
          os.remove(full)
        except FileNotFoundError:
          pass
      removed.append(name)
  return removed


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir."""


class WorkdirLock:
  """Exclusive lock on W/.lock for the lifetime of a run (see the module docstring)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, '.lock')
    self._fd: Optional[int] = None

  def acquire(self) -> 'WorkdirLock':
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      try:
        with open(self.path) as f:
          owner = json.load(f)
        who = f'pid {owner["pid"]} on {owner["host"]} (started {owner["started"]})'
      except (OSError, ValueError, KeyError):
        who = 'another process'
      raise WorkdirLockedError(
          f'{os.path.dirname(self.path)} is in use by {who}; wait for it to finish, stop it, '
          'or use another --workdir') from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': _HOST,
                             'started': time.strftime('%Y-%m-%d %H:%M:%S')}).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing drops the lock; the file stays (harmless, reused)
      self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# Config keys that may differ when a run resumes: durations (extend or shorten), cadences,
# where the data lives and how it is read, and how the same computation is laid out on the
# hardware. Anything else would silently mix two runs in one workdir.
RESUMABLE_KEYS = (
    'total_steps', 'total_epochs', 'total_examples',
    'log_every', 'checkpoint_every', 'keep_checkpoints', 'async_checkpoint',
    'eval_every', 'evals', 'evals.*',
    'data.data_dir', 'data.worker_count', 'data.prefetch', 'data.read_threads',
    'data.max_maskless_fraction',
    'mesh.*', 'fsdp_min_size', 'grad_accum', 'model.attention', 'model.remat',
    'model.scan_layers',  # the checkpoint's block layout is converted on restore
)
DURATION_KEYS = ('total_steps', 'total_epochs', 'total_examples')
OVERRIDE_HINT = ('pass --allow_config_change to resume anyway (the new config is recorded in '
                 'config.json and history.jsonl), or use another --workdir')


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} → {'a.b': 1} (JSON-like dicts)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_changes(old: dict, new: dict) -> dict:
  """{dotted key: (old value, new value)} for every key whose value differs."""
  a, b = flatten(old), flatten(new)
  missing = object()
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k, missing) != b.get(k, missing)}


def refused_changes(changes: dict) -> dict:
  """The subset of `changes` that resuming may not silently accept."""
  import fnmatch
  return {k: v for k, v in changes.items()
          if not any(fnmatch.fnmatchcase(k, p) for p in RESUMABLE_KEYS)}


def describe_changes(changes: dict) -> str:
  """'key: old → new, ...' in one line."""
  return ', '.join(f'{k}: {old!r} → {new!r}' for k, (old, new) in changes.items())


def append_history(workdir: str, event: str, **fields) -> None:
  """One JSON line in W/history.jsonl: what happened to the run and when (starts, resumes,
  config changes, extensions, checkpoints skipped as corrupt)."""
  record = {'time': time.strftime('%Y-%m-%dT%H:%M:%S'), 'event': event, **fields}
  with open(os.path.join(workdir, 'history.jsonl'), 'a') as f:
    f.write(json.dumps(record, default=str) + '\n')
