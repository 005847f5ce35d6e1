"""Orbax checkpoints of the whole train state, the data-iterator state and the config.

Layout of a workdir W:
  W/config.json                the config the run was started with
  W/checkpoints/<step>/        orbax: state (params, opt_state, objective state, step, rng),
                               data (loader state, JSON), config (JSON)
  W/params/                    (optional) params only: written by `save_params` (e.g. an
                               imported PyTorch model) and read by `restore_params`.
Orbax writes each step to a temporary directory and renames it when complete, so a
kill -9 at any moment leaves the previous checkpoints intact.
"""

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


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
  """Writes W/config.json atomically (temp file + rename)."""
  path = resolve(workdir) / 'config.json'
  tmp = path.parent / f'.config.json.tmp{os.getpid()}'
  tmp.write_text(config_to_json(config))
  tmp.rename(path)


class Checkpointer:
  """A thin wrapper over orbax's CheckpointManager for W/checkpoints."""

  def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
    self.directory = resolve(workdir) / 'checkpoints'
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=('state', 'data', 'config'))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, config: ml_collections.ConfigDict,
           *, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config_to_json(config)))), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto the shardings of `abstract_state` (any device count)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out.state, out.data

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
