"""Orbax checkpoints of the whole train state, the data-iterator state and the config.

Layout of a workdir W:
  W/config.json                the config the run was started with
  W/checkpoints/<step>/        orbax: state (params, opt_state, objective state, step, rng),
                               data (loader state, JSON), config (JSON)
  W/params/                    (optional) params only: written by `save_params` (e.g. an
                               imported PyTorch model) and read by `restore_params`.
  W/checkpoints.corrupt/<step>/ unreadable checkpoints set aside on resume (never deleted)
  W/history.jsonl              starts, resumes (with config changes), set-aside checkpoints
  W/.lock                      held by the running trainer (mimjax.workdir.WorkdirLock)
Orbax writes each step to a temporary directory and renames it when complete, so a
kill -9 at any moment leaves the previous checkpoints intact.
"""

import contextlib
import json
import logging
import os
import sys
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mimjax import workdir as workdir_lib


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
  return ml_collections.ConfigDict(json.loads(path.read_text()))


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

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, config: ml_collections.ConfigDict,
           *, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config_to_json(config)))), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto the shardings of `abstract_state` (any device count)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract_state)),
        data=ocp.args.JsonRestore()))
    return out.state, out.data

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """(step, state, data state) of the newest intact checkpoint, or None if there is none.

    A checkpoint that cannot be read (truncated or empty files) is moved to
    W/checkpoints.corrupt/<step> (kept for inspection, never deleted) with a warning, and the
    next older one is tried; if none is intact, one error line names every bad one. A
    checkpoint whose shapes differ from this model is an error (an older one would differ too).
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
      check_shapes(meta, abstract_state, str(path))
      try:
        with _quiet_orbax():
          state, data = self.restore(step, abstract_state)
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
        print(f'mimjax: warning: checkpoint {self.directory / str(step)} is unreadable '
              f'({why}); moved it to {target} and resuming from step {good}',
              file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('mimjax_corrupt_checkpoints_moved')
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(e: BaseException, limit: int = 200) -> str:
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


def restore_train_state(workdir: str, step: Optional[int] = None) -> dict:
  """{'params', 'state', ...} (numpy) of a workdir's latest (or `step`) train checkpoint; a
  params-only workdir (W/params, e.g. an imported model) gives {'params': ..., 'state': {}}."""
  root = resolve(workdir)
  ckpt_dir = root / 'checkpoints'
  steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) \
      if ckpt_dir.exists() else []
  if step is not None and step not in steps:
    raise FileNotFoundError(f'{ckpt_dir}: no checkpoint for step {step}; found {steps}')
  if steps:
    return _restore_numpy(ckpt_dir / str(step if step is not None else steps[-1]) / 'state')
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
