"""What the evaluators share: the `Evaluator` base, building the configured evaluators
(`config.evals.<name>`), and writing W/results.json. Used by the training loop (online
monitors, the objective's own `evaluate`) and by evaluation-only runs (`evaluate/run.py`)."""

import importlib
import json
import os
from typing import Any

import ml_collections

from mimjax import logs
from mimjax import workdir as workdir_lib
from mimjax.data import pipeline
from mimjax.objectives import pretrained


class Evaluator:
  """What every evaluator shares: `name`, `every_steps`, the encoder `path` inside the params,
  the weights it reads, the `splits` it reads (the trainer skips it at start-up when the data
  set lacks one), the mesh, the data/seed/batch settings, and `details` (arrays for JSON files
  and plots).

  Weights: `cfg.checkpoint_key` (else `config.checkpoint_key`, else 'teacher') as in
  `load_pretrained`: a monitor of an objective with an EMA teacher (DINO) reads the teacher
  from the objective state, as DINO's eval_knn.py; 'student' reads the trained params.
  """

  # cfg key → default split; evaluators that read a train and a test split override it.
  SPLIT_KEYS = {'split': 'test'}

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
               objective: Any, mesh):
    self.name = name
    self.every_steps = int(cfg.get('every_steps') or 1 << 62)
    self.cfg = cfg
    self.path = tuple(objective.encoder)
    self.objective = objective
    self.checkpoint_key = cfg.get('checkpoint_key') or config.get('checkpoint_key') or 'teacher'
    if self.checkpoint_key not in pretrained.CHECKPOINT_KEYS:
      raise ValueError(f'config.evals.{name}.checkpoint_key={self.checkpoint_key!r}: expected '
                       f'one of {pretrained.CHECKPOINT_KEYS}')
    self.splits = tuple(self.split(key) for key in self.SPLIT_KEYS)
    self.mesh = mesh
    self.data_config = config.data
    self.seed = config.seed
    self.batch_size = int(cfg.get('batch_size') or config.batch_size)
    self.details = {}

  def split(self, key: str) -> str:
    """The split named by `cfg.<key>` (one of SPLIT_KEYS), else its default."""
    return self.cfg.get(key) or self.SPLIT_KEYS[key]

  def encoder_params(self, params: Any, state: Any) -> Any:
    """The encoder subtree of the weights `checkpoint_key` selects (see class doc)."""
    try:
      weights, _ = pretrained.select_weights(self.objective, params, state, self.checkpoint_key)
    except KeyError as e:
      raise ValueError(f'config.evals.{self.name}: the objective state has no EMA teacher '
                       f'({e.args[0]}); set checkpoint_key=student') from None
    return pretrained.subtree(weights, self.path)

  def make_extractor(self, config: ml_collections.ConfigDict, pool: str = 'cls') -> pretrained.Extractor:
    """A feature extractor for `cfg.layer` / `cfg.pool` with this evaluator's settings."""
    return pretrained.Extractor(config.model, config.data, self.mesh,
                                batch_size=self.batch_size, layer=int(self.cfg.get('layer', -1)),
                                pool_name=self.cfg.get('pool', pool), seed=self.seed)


class ObjectiveEvaluator:
  """The objective's own `evaluate` (probes, fine-tuning) as an evaluator."""

  def __init__(self, objective, every_steps):
    self.name, self.every_steps, self._fn = 'eval', every_steps, objective.evaluate

  def run(self, params, state):
    return self._fn(params, state)


def make_evaluators(config: ml_collections.ConfigDict, objective: Any,
                    mesh) -> list:
  """`config.evals.<name>` = {module, every_steps, ...} → mimjax.evaluate.<module>.make(...)
  objects with `.name`, `.every_steps` and `.run(params, state) -> dict` (e.g. a kNN monitor)."""
  out = []
  if objective.evaluate is not None:
    out.append(ObjectiveEvaluator(objective, config.get('eval_every') or 1 << 62))
  for name, cfg in (config.get('evals') or {}).items():
    try:
      module = importlib.import_module(f'mimjax.evaluate.{cfg.module}')
    except ModuleNotFoundError as e:
      raise ValueError(f'config.evals.{name}.module={cfg.module!r}: no module '
                       f'mimjax.evaluate.{cfg.module}') from e
    evaluator = module.make(name, cfg, config, objective, mesh)
    missing = missing_splits(config.data, getattr(evaluator, 'splits', ()))
    if missing:  # say so now, not after the whole training run
      logs.say(f'warning: config.evals.{name} skipped: data set {config.data.name!r} has no '
           f'split {missing[0]!r}')
      continue
    out.append(evaluator)
  return out


def missing_splits(data_config: ml_collections.ConfigDict, splits) -> list:
  """The entries of `splits` the configured data set does not have (eval aliases resolved)."""
  missing = []
  for split in splits:
    try:
      pipeline.num_examples(data_config, split)
    except ValueError:
      missing.append(split)
  return missing


def write_results(workdir: str, step: int, results: dict) -> None:
  """W/results.json (atomic), the final evaluation numbers."""
  workdir_lib.atomic_write(
      os.path.join(workdir, 'results.json'),
      json.dumps({'step': step, **{k: float(v) for k, v in results.items()}}, indent=2))
