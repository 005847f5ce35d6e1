"""Frozen pretrained encoders: find them in a workdir, build them, extract token features.

A pretrained workdir W is either a training run (`W/config.json` + `W/checkpoints/`) or an
imported PyTorch model (`W/config.json` + `W/params/`, written by `python -m mimjax.convert`).
The ViT encoder sits at the pretraining objective's `encoder` path inside the params (imported
models: ('encoder',)). Models with several prefix tokens (proxy / register tokens) declare
`model.num_prefix_tokens`; every readout here treats the first that-many tokens as [cls]-like.
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mimjax.data import pipeline
from mimjax.data.normalize import normalize_images
from mimjax.models import readout
from mimjax.models.vit import ViT, num_prefix_tokens  # noqa: F401 (num_prefix_tokens: re-export)
from mimjax import checkpoint
from mimjax import sharding

CHECKPOINT_KEYS = ('teacher', 'student')


@dataclasses.dataclass(frozen=True)
class EncoderRef:
  """What an evaluator needs from an objective: where the encoder sits in the params
  (no `evaluate` of its own: evaluation-only runs have no objective)."""
  encoder: tuple[str, ...] = ('encoder',)
  evaluate: None = None
  teacher: None = None
  predict: None = None


def pretrained_objective(pretrain_config: ml_collections.ConfigDict) -> Any:
  """The objective a workdir was trained with (its `encoder` / `teacher` / `predict`), or an
  EncoderRef for imported models (no objective)."""
  if pretrain_config.get('encoder_path'):
    return EncoderRef(tuple(pretrain_config.encoder_path.split('/')))
  if not pretrain_config.get('objective'):
    return EncoderRef()
  from mimjax.objectives import base  # objectives build modules; only needed for the paths
  return base.load(pretrain_config.objective).make(pretrain_config)


def encoder_path(pretrain_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The pretraining objective's `encoder` path; ('encoder',) for imported models."""
  return tuple(pretrained_objective(pretrain_config).encoder)


def subtree(params: Any, path: tuple[str, ...]) -> Any:
  """params[path[0]][path[1]]...; a clear error when a key is missing."""
  for key in path:
    if key not in params:
      raise ValueError(f'params have no {key!r} subtree on the encoder path {path} '
                       f'(keys: {sorted(params)})')
    params = params[key]
  return params


def nest(path: tuple[str, ...], tree: Any) -> dict:
  """{path[0]: {path[1]: ... tree}}."""
  for key in reversed(path):
    tree = {key: tree}
  return tree


def merge_model_config(pretrained: ml_collections.ConfigDict,
                       overrides: Optional[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
  """The pretrained `config.model` with the eval config's non-None `model.*` keys on top
  (dtype, attention, remat, drop_path, image_size for fine-tuning at another resolution)."""
  out = ml_collections.ConfigDict(pretrained.to_dict())
  for key, value in (overrides.to_dict() if overrides is not None else {}).items():
    if value is not None:
      out[key] = value
  # Evaluation never feeds SAM segments: an MRE encoder runs as a plain ViT.
  return out


def _load_config(workdir: str) -> ml_collections.ConfigDict:
  """W/config.json with its complete `model` (see `full_model_config`)."""
  if not workdir:
    raise ValueError('config.pretrained is empty: expected a pretraining workdir (or a '
                     'converted model), e.g. --config.pretrained=workdirs/mae_tiny')
  config = checkpoint.load_config(workdir)
  if 'model' not in config:
    raise ValueError(f'{workdir}/config.json has no `model` section')
  config.model = full_model_config(config)
  return config


def full_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A workdir config's complete `model`: fine-tuning and probe runs store only `model.*`
  overrides, laid here over the model of their `pretrained` workdir."""
  if config.model.get('variant') or not config.get('pretrained'):
    return config.model
  return merge_model_config(_load_config(config.pretrained).model, config.model)


def load_pretrained_config(workdir: str) -> tuple[ml_collections.ConfigDict, tuple[str, ...]]:
  """(pretraining config with its complete model, encoder path) of workdir W."""
  config = _load_config(workdir)
  return config, encoder_path(config)


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A pretrained workdir, loaded: config (complete model), objective, the chosen weights."""
  config: ml_collections.ConfigDict
  objective: Any   # its `encoder` path, `teacher` path, `predict` (an EncoderRef if imported)
  params: Any      # whole params tree of the chosen weights (numpy): student or EMA teacher
  state: Any       # the checkpoint's objective state ({} for imported models)
  weights: str     # 'teacher' (EMA teacher), 'student', or 'trained' (the only weights)

  @property
  def path(self) -> tuple[str, ...]:
    return tuple(self.objective.encoder)

  @property
  def encoder(self) -> Any:
    return subtree(self.params, self.path)


def load_pretrained(workdir: str, checkpoint_key: str = 'teacher',
                    step: Optional[int] = None) -> Pretrained:
  """The one loader of a pretrained workdir (evaluation, probes, fine-tuning, export, KD).

  checkpoint_key 'teacher' (default, as DINO's eval_knn.py / eval_linear.py) takes the EMA
  teacher of objectives that keep one (`Objective.teacher`, DINO); 'student' the trained
  params. Objectives without a teacher (MAE, ...) and params-only workdirs have one set of
  weights: both keys give it.
  """
  config = _load_config(workdir)
  objective = pretrained_objective(config)
  train_state = checkpoint.restore_train_state(workdir, step)
  state = train_state.get('state', {})
  try:
    params, weights = select_weights(objective, train_state['params'], state, checkpoint_key)
  except KeyError as e:
    raise ValueError(f'{workdir}: the checkpoint has no EMA teacher ({e.args[0]}); pass '
                     'checkpoint_key=student for the trained params') from None
  return Pretrained(config, objective, params, state, weights)


def select_weights(objective: Any, params: Any, state: Any,
                   checkpoint_key: str = 'teacher') -> tuple[Any, str]:
  """(whole params tree, 'teacher' | 'student' | 'trained'): the EMA teacher at
  `objective.teacher` inside `state` for checkpoint_key 'teacher' when the objective keeps one
  (and `state` is not empty: a params-only workdir holds one set of weights), else `params`.
  A missing teacher subtree raises KeyError."""
  if checkpoint_key not in CHECKPOINT_KEYS:
    raise ValueError(f'checkpoint_key={checkpoint_key!r}: expected one of {CHECKPOINT_KEYS}')
  if checkpoint_key == 'teacher' and objective.teacher is not None and state:
    try:
      return subtree(state, tuple(objective.teacher)), 'teacher'
    except ValueError as e:
      raise KeyError(str(e)) from None
  return params, 'student' if objective.teacher is not None else 'trained'


class Extractor:
  """Pooled features of a frozen encoder over a whole split (eval view, padding dropped)."""

  def __init__(self, model_config: ml_collections.ConfigDict,
               data_config: ml_collections.ConfigDict,
               mesh, *, batch_size: int, layer: int = -1, pool_name: str = 'cls', seed: int = 0):
    self.model = ViT(model_config)
    self.data_config = data_config
    self.mesh = mesh
    self.batch_size = batch_size
    self.seed = seed
    prefix = num_prefix_tokens(model_config)

    def features(params, images):
      tokens, _ = readout.select_tokens(self.model, params, normalize_images(images), layer,
                                        readout.reads_final_norm(pool_name))
      return readout.pool(tokens, pool_name, prefix).astype(jnp.float32)

    self._fn = sharding.jit_on(mesh, features)

  def __call__(self, params: Any, split: str, limit: Optional[int] = None):
    """(features (n, D) float32, labels (n,) int32) of `split` (the first `limit` examples)."""
    return extract(self._fn, params, self.data_config, self.mesh, split, self.batch_size,
                   self.seed, limit)


def extract(fn: Callable, params: Any, data_config: ml_collections.ConfigDict, mesh,
            split: str, batch_size: int, seed: int = 0, limit: Optional[int] = None):
  """Runs fn(params, uint8 images) over a split; returns (outputs, labels) as numpy
  (outputs: an array or a dict of arrays, rows = examples, padding rows dropped)."""
  loader = pipeline.make_loader(data_config, global_batch_size=batch_size, seed=seed,
                                split=split, train=False)
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  outs, labels, seen = [], [], 0
  for batch in loader:
    out = fn(params, sharding.put_batch({'image': batch['image']}, mesh)['image'])
    # Every host gets every row (hosts hold consecutive slices of the global batch).
    keep = gather(batch['mask'])
    outs.append(jax.tree.map(lambda x: gather(x)[keep], out))
    labels.append(gather(batch['label'])[keep])
    seen += int(keep.sum())
    if limit is not None and seen >= limit:
      break
  outs = jax.tree.map(lambda *xs: np.concatenate(xs)[:limit], *outs)
  return outs, np.concatenate(labels).astype(np.int32)[:limit]


def replicate(params: Any, mesh) -> Any:
  """Host numpy params → replicated device arrays on `mesh`."""
  return jax.device_put(params, sharding.replicated(mesh))
