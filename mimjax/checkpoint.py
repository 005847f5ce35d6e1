"""Orbax checkpoints of the whole train state, the data-iterator state and the config.

Layout of a workdir W:
  W/config.json                the config the run was started with
  W/checkpoints/<step>/        orbax: state (params, opt_state, objective state, step, rng),
                               data (loader state, JSON), config (JSON), and
                               digests.json: the sha256 of every file, verified on restore
  W/params/                    (optional) params only: written by `save_params` (e.g. an
                               imported PyTorch model) and read by `restore_params`.
  W/checkpoints.corrupt/<step>/ unreadable checkpoints set aside on resume (never deleted)
  W/history.jsonl              starts, resumes (with config changes), set-aside checkpoints
  W/.lock                      held by the running trainer (mimjax.workdir.WorkdirLock)
Orbax writes each step to a temporary directory and renames it when complete, so a
kill -9 at any moment leaves the previous checkpoints intact. Damage after that (a bad disk, a
stray write into a file, same size) would restore silently wrong values, so once orbax has
committed a step a background thread writes digests.json (process 0; the training thread does
not wait for it), and every restore compares the files first: a mismatch is treated like an
unreadable checkpoint. A step committed but killed before its digests were written restores
unverified (as do checkpoints written before digests existed).
"""

import concurrent.futures
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import sys
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mimjax import workdir as workdir_lib
from mimjax.models import layout


def resolve(workdir: str) -> epath.Path:
  """A user-typed workdir as an absolute path (relative to the cwd, `~` expanded): orbax and
  tensorstore need absolute paths, and every entry point here goes through this one place.
  Cloud URLs (gs://...) are returned unchanged."""
  workdir = os.fspath(workdir)
  if '://' in workdir:
    return epath.Path(workdir)
  return epath.Path(os.path.abspath(os.path.expanduser(workdir)))


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads W/config.json (clear error if W is not a mimjax workdir)."""
  path = resolve(workdir) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found; expected a mimjax workdir with config.json '
                            '(written by `python -m mimjax.main` or `python -m mimjax.convert`)')
  return ml_collections.ConfigDict(read_config_json(workdir))


def read_config_json(workdir: str) -> Optional[dict]:
  """W/config.json as a dict (None if absent). A damaged one (truncated, empty, garbage) is
  restored from the config saved in the newest intact checkpoint, with one warning line;
  without such a copy, one error line names the file and what to do."""
  path = resolve(workdir) / 'config.json'
  if not path.exists():
    return None
  try:
    config = json.loads(path.read_bytes())
    if isinstance(config, dict):
      return config
    why = f'a JSON {type(config).__name__}, not an object'
  except (ValueError, UnicodeDecodeError) as e:
    why = (str(e).splitlines() or [type(e).__name__])[0][:120]
  for step in reversed(saved_steps(workdir)):
    step_dir = resolve(workdir) / 'checkpoints' / str(step)
    try:
      verify_digests(os.fspath(step_dir))
      with _quiet_orbax():
        config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / 'config')
    except Exception:  # pylint: disable=broad-except  (damaged too: try the one before)
      continue
    if jax.process_index() == 0:
      workdir_lib.atomic_write(os.fspath(path), json.dumps(config, indent=2, sort_keys=True))
    print(f'mimjax: warning: {path} is damaged ({why}); restored it from the config saved in '
          f'{step_dir}', file=sys.stderr, flush=True)
    return config
  raise ValueError(f'{path} is damaged ({why}) and no checkpoint holds a readable copy; put back '
                   'a good copy, or delete it (a training re-run then writes the command\'s '
                   'config without comparing it to the old run\'s)')


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes W/config.json atomically (replacing an existing one)."""
  workdir_lib.atomic_write(os.fspath(resolve(workdir) / 'config.json'), config_to_json(config))


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The handler of the train state (the format StandardSave writes), with orbax's
  replica-parallel save only across hosts.

  orbax splits every replicated array into one slice per replica so several hosts can write
  it together; on one host each slice is an eager `slice_in_dim` that compiles its own little
  program on the first save (tiny MAE on 8 CPU devices: ~180 programs, 25 of the run's 60 s).
  Within one process there is nobody to share the write with, so it is off there.
  """
  arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1)
  registry = ocp.type_handlers.create_type_handler_registry(
      (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()),
      (np.ndarray, ocp.type_handlers.NumpyHandler()), (jax.Array, arrays),
      (str, ocp.type_handlers.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


DIGESTS = 'digests.json'


class CheckpointWriteError(OSError):
  """Saving a checkpoint failed (e.g. a full disk); the message is one line."""


class CorruptCheckpointError(ValueError):
  """A checkpoint's files differ from the digests written when it was committed."""


def _file_digest(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def _checkpoint_files(step_dir: str) -> list:
  """Every file of a checkpoint directory (relative paths, sorted), its digests file aside."""
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
  return sorted(f for f in out if f != DIGESTS)


def write_digests(step_dir: str) -> None:
  """Writes <step_dir>/digests.json: the sha256 of every file of a committed checkpoint."""
  files = {f: _file_digest(os.path.join(step_dir, f)) for f in _checkpoint_files(step_dir)}
  workdir_lib.atomic_write(os.path.join(step_dir, DIGESTS),
                           json.dumps({'algorithm': 'sha256', 'files': files}, indent=0))


def verify_digests(step_dir: str) -> bool:
  """True when every file matches <step_dir>/digests.json, False when there is no such file
  (written before digests existed, or killed before they were); CorruptCheckpointError
  naming the first file that differs or is missing."""
  path = os.path.join(step_dir, DIGESTS)
  if not os.path.exists(path):
    return False
  try:
    expected = json.loads(open(path, 'rb').read())['files']
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise CorruptCheckpointError(f'{path} is unreadable ({type(e).__name__})') from None
  names = sorted(expected)
  workers = min(8, os.cpu_count() or 1)  # hashlib releases the GIL: files hash in parallel
  def digest(name):
    full = os.path.join(step_dir, name)
    return _file_digest(full) if os.path.exists(full) else None
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for name, got in zip(names, pool.map(digest, names)):
      if got is None:
        raise CorruptCheckpointError(f'{name} is missing (listed in {DIGESTS})')
      if got != expected[name]:
        raise CorruptCheckpointError(f'{name} does not match its sha256 in {DIGESTS} '
                                     '(changed after it was written)')
  return True


def _local_verdict(step_dir: str) -> tuple:
  """(1 verified | 0 no digests | -1 mismatch, the error) of `verify_digests` on process 0;
  (0, None) on the other hosts."""
  if jax.process_index() != 0:
    return 0, None
  try:
    return int(verify_digests(step_dir)), None
  except CorruptCheckpointError as e:
    return -1, e


def _shared_verdict(verdict: int, error: Optional[Exception]) -> bool:
  """Process 0's verdict on every host; raises on -1."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    verdict = int(multihost_utils.broadcast_one_to_all(np.int32(verdict)))
  if verdict < 0:
    raise error or CorruptCheckpointError(f'{DIGESTS} mismatch (found by process 0)')
  return bool(verdict)


class Checkpointer:
  """A thin wrapper over orbax's CheckpointManager for W/checkpoints."""

  def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
    self.directory = resolve(workdir) / 'checkpoints'
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_handlers={'state': _state_handler(), 'data': ocp.JsonCheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()})
    # Digests are written after orbax commits a step, off the training thread, one at a time.
    self._digests = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='digests')
    self._pending: list = []
    self.restored_verified: Optional[bool] = None  # did the last restore match its digests?

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, config: ml_collections.ConfigDict,
           *, force: bool = False) -> None:
    """Starts saving `step` (async by default); a failed write, this one's or the previous
    async one's, is a one-line CheckpointWriteError."""
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(json.loads(config_to_json(config)))), force=force)
    except Exception as e:  # pylint: disable=broad-except  (orbax/TensorStore error types vary)
      raise self._write_error(e, step) from None
    if jax.process_index() == 0:  # hosts share the workdir: one writer
      self._pending = [f for f in self._pending if not f.done()]
      self._pending.append(self._digests.submit(self._digest_when_committed, step))

  def _digest_when_committed(self, step: int) -> None:
    """Waits for orbax to commit `step` (rename of its temporary directory), then writes
    its digests.json; a step that failed to save or was deleted meanwhile is skipped."""
    while self.manager.is_saving_in_progress():
      time.sleep(0.02)
    path = os.fspath(self.directory / str(step))
    if not os.path.isdir(path):
      return
    try:
      write_digests(path)
    except FileNotFoundError:  # removed by max_to_keep while being read
      pass
    except OSError as e:  # e.g. disk full: the checkpoint itself is complete
      print(f'mimjax: warning: could not write {path}/{DIGESTS} ({e.strerror or e}); that '
            'checkpoint will restore unverified', file=sys.stderr, flush=True)

  def restore(self, step: int, abstract_state: Any,
              saved_scanned: Optional[bool] = None) -> tuple[Any, dict]:
    """Restores onto the shardings of `abstract_state` (any device count). `saved_scanned`:
    the block layout of the checkpoint (mimjax.models.layout) when it differs from
    `abstract_state`'s: the state is then read on the host in the saved layout, converted, and
    placed onto the target shardings (once, on a resume that changed `model.scan_layers`)."""
    if saved_scanned is not None and saved_scanned != layout.is_scanned(abstract_state):
      saved = layout.to_layout(abstract_state, saved_scanned)
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(saved, restore_args=jax.tree.map(
              lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)),
          data=ocp.args.JsonRestore()))
      state = layout.to_layout(out.state, not saved_scanned)
      place = lambda a, t: jax.make_array_from_callback(t.shape, t.sharding, lambda i: a[i])
      return jax.tree.map(place, state, abstract_state), out.data
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract_state)),
        data=ocp.args.JsonRestore()))
    return out.state, out.data

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """(step, state, data state) of the newest intact checkpoint, or None if there is none.

    A checkpoint that cannot be read (truncated or empty files) or whose files differ from its
    digests.json is moved to
    W/checkpoints.corrupt/<step> (kept for inspection, never deleted) with a warning, and the
    next older one is tried; if none is intact, one error line names every bad one. A
    checkpoint whose shapes differ from this model is an error (an older one would differ too);
    one written with the other block layout (`model.scan_layers`) is converted on restore.
    """
    bad = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      path = self.directory / str(step)
      try:
        with _quiet_orbax():
          meta = _state_metadata(path / 'state')
      except Exception as e:  # pylint: disable=broad-except  (any unreadable file)
        bad.append((step, _first_line(e)))
        continue
      saved_scanned = layout.is_scanned(meta)
      check_shapes(meta, layout.to_layout(abstract_state, saved_scanned), str(path))
      try:
        # Digests first: orbax is never asked to read a checkpoint known to be damaged.
        verified = _shared_verdict(*_local_verdict(os.fspath(path)))
        with _quiet_orbax():
          state, data = self.restore(step, abstract_state, saved_scanned)
        self.restored_verified = verified
      except Exception as e:  # pylint: disable=broad-except
        bad.append((step, _first_line(e)))
        continue
      if bad:
        self._set_aside(bad, step)
      return step, state, data
    if bad:
      raise ValueError(f'{self.directory}: no readable checkpoint: ' + '; '.join(
          f'step {s}: {why}' for s, why in bad) + ' (delete the workdir or fix the files)')
    return None

  def _set_aside(self, bad: list, good: int) -> None:
    """Moves unreadable checkpoints out of orbax's way so they are not overwritten."""
    aside = self.directory.parent / 'checkpoints.corrupt'
    for step, why in bad:
      target = aside / str(step)
      if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        if target.exists():
          target = aside / f'{step}-{os.getpid()}'
        (self.directory / str(step)).rename(target)
        workdir_lib.append_history(str(self.directory.parent), 'corrupt_checkpoint', step=step,
                                   reason=why, moved_to=str(target), resumed_from=good)
        print(f'mimjax: warning: checkpoint {self.directory / str(step)} is damaged '
              f'({why}); moved it to {target} and resuming from step {good}',
              file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('mimjax_corrupt_checkpoints_moved')
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until the last save is committed and its digests are written."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e, None) from None
    concurrent.futures.wait(self._pending)

  def _write_error(self, e: BaseException, step: Optional[int]) -> 'CheckpointWriteError':
    """One line: which checkpoint failed, why (a full disk said plainly), what is intact."""
    text = str(e)
    failed = re.search(r'(\d+)\.orbax-checkpoint-tmp', text)
    failed = int(failed.group(1)) if failed else step
    full = 'No space left on device' in text or getattr(e, 'errno', None) == errno.ENOSPC
    why = ('no space left on device: free space there or lower --config.keep_checkpoints'
           if full else _first_line(e))
    intact = [s for s in saved_steps(os.fspath(self.directory.parent)) if s != failed]
    left = (f'checkpoint {intact[-1]} is intact' if intact else 'no checkpoint was written yet')
    return CheckpointWriteError(
        f'{self.directory}: writing checkpoint {"" if failed is None else failed} failed '
        f'({why}); {left}; then re-run the same command')

  def close(self) -> None:
    self.wait()
    self._digests.shutdown()
    self.manager.close()


def _first_line(e: BaseException, limit: int = 300) -> str:
  """`Type: first line` of the innermost cause (TensorStore's outer error only points at a
  bound method's repr; the cause says what is wrong with which file)."""
  while (e.__cause__ or e.__context__) is not None and 'TensorStore details' in str(e):
    e = e.__cause__ or e.__context__
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return f'{type(e).__name__}: {text[:limit]}'


@contextlib.contextmanager
def _quiet_orbax():
  """A failing orbax read logs each failed async task (hundreds of asyncio/absl lines);
  the caller reports the failure in one line instead."""
  loggers = [logging.getLogger(n) for n in ('asyncio', 'absl')]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def _state_metadata(path: epath.Path) -> Any:
  meta = ocp.PyTreeCheckpointer().metadata(path)
  tree = getattr(meta, 'item_metadata', None) or getattr(meta, 'tree', None)
  if tree is None or not hasattr(tree, 'get') or tree.get('params') is None:
    raise ValueError(f'{path}: no readable array metadata')
  return tree


def _shapes(tree: Any) -> dict:
  """{'params/a/b': shape} for the params and objective state of a train state."""
  out = {}
  for part in ('params', 'state'):
    sub = tree.get(part) if hasattr(tree, 'get') else None
    for path, leaf in jax.tree_util.tree_flatten_with_path(sub or {})[0]:
      keys = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]
      out['/'.join([part] + keys)] = tuple(getattr(leaf, 'shape', ()) or ())
  return out


def check_shapes(saved: Any, abstract_state: Any, where: str) -> None:
  """One error line naming the params whose shapes differ between a checkpoint and the model."""
  a, b = _shapes(saved), _shapes(abstract_state)
  diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  if diff:
    shown = ', '.join(f'{k}: checkpoint {a.get(k, "absent")} vs model {b.get(k, "absent")}'
                      for k in diff[:3])
    more = f' (and {len(diff) - 3} more)' if len(diff) > 3 else ''
    raise ValueError(f'{where} does not fit this model: {shown}{more}; the model config '
                     'differs from the run that wrote it (see config.json)')


def _restore_numpy(path: epath.Path) -> Any:
  """Restores an orbax pytree as host numpy arrays, whatever devices it was saved from."""
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(path)
  tree = getattr(meta, 'item_metadata', None) or getattr(meta, 'tree', None) or meta
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def saved_steps(workdir: str) -> list:
  """The steps of W/checkpoints/<step>/ (committed checkpoints), ascending."""
  ckpt_dir = resolve(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) \
      if ckpt_dir.exists() else []


def restore_train_state(workdir: str, step: Optional[int] = None) -> dict:
  """{'params', 'state', ...} (numpy) of a workdir's latest (or `step`) train checkpoint; a
  params-only workdir (W/params, e.g. an imported model) gives {'params': ..., 'state': {}}."""
  root = resolve(workdir)
  ckpt_dir = root / 'checkpoints'
  steps = saved_steps(workdir)
  if step is not None and step not in steps:
    raise FileNotFoundError(f'{ckpt_dir}: no checkpoint for step {step}; found {steps}')
  if steps:
    path = ckpt_dir / str(step if step is not None else steps[-1])
    try:
      verify_digests(os.fspath(path))
    except CorruptCheckpointError as e:
      raise CorruptCheckpointError(
          f'{path}: {e}; move it aside (into {root}/checkpoints.corrupt/) to use the step '
          f'before it, or name another one (found {steps})') from None
    return _restore_numpy(path / 'state')
  if (root / 'params').exists():
    return {'params': _restore_numpy(root / 'params'), 'state': {}}
  raise FileNotFoundError(f'{root}: no checkpoints/<step>/ and no params/ found; expected a '
                          'mimjax training workdir or a converted model')


def restore_params(workdir: str, step: Optional[int] = None) -> Any:
  """Params (numpy) of a workdir: the latest (or `step`) train checkpoint, else W/params."""
  return restore_train_state(workdir, step)['params']


def save_params(workdir: str, config: ml_collections.ConfigDict, params: Any) -> None:
  """Writes W/config.json and W/params/ (a params-only checkpoint, e.g. an imported model)."""
  root = resolve(workdir)
  root.mkdir(parents=True, exist_ok=True)
  ocp.PyTreeCheckpointer().save(root / 'params', args=ocp.args.PyTreeSave(params), force=True)
  write_config(workdir, config)
