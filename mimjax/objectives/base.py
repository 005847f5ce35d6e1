"""The contract between an objective and the trainer."""

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

Params = Any
State = Any  # non-trained objective state: EMA teacher, DINO center, BatchNorm stats, ...
Metrics = dict


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the trainer needs to know about an objective, and nothing more.

  init(rng, batch) -> (params, state): `batch` is an example host batch (shapes matter).
  loss(params, state, batch, rng, step) -> (loss, (new_state, metrics)); `batch` holds
    device arrays as the loader yields them (uint8 images are normalised by the objective).
  after_update(params, state, step) -> state: runs after each optimizer update (EMA).
  evaluate(params, state) -> dict of scalars: run by the trainer at the end of training
    (and every `config.eval_every` steps); written to W/results.json (evaluation protocols
    such as linear probing and fine-tuning are objectives that define it).
  encoder: path of the exportable ViT encoder inside params (for eval/convert).
  teacher: path inside the objective state of an EMA teacher with the same tree as params
    (DINO); evaluations, export and KD load it by default (`checkpoint_key='teacher'`), as
    DINO's eval_knn.py / eval_linear.py do. None: the params are the only weights.
  predict(params, state, uint8 images) -> logits: classifier objectives (fine-tuning, linear
    probe), for checking an exported classifier against the trained one.
  """
  init: Callable[[jax.Array, dict], tuple[Params, State]]
  loss: Callable[[Params, State, dict, jax.Array, jnp.ndarray], tuple[jnp.ndarray, tuple[State, Metrics]]]
  after_update: Optional[Callable[[Params, State, jnp.ndarray], State]] = None
  evaluate: Optional[Callable[[Params, State], dict]] = None
  encoder: tuple[str, ...] = ('encoder',)
  teacher: Optional[tuple[str, ...]] = None
  predict: Optional[Callable[[Params, State, jnp.ndarray], jnp.ndarray]] = None


# Modules of this layer that are not objectives: the contract itself and what several
# objectives and the evaluators share (a pretrained encoder's loader, test-split accuracy).
SHARED = ('base', 'pretrained', 'accuracy')


def available() -> list[str]:
  """Names of the objective modules shipped in mimjax.objectives."""
  import mimjax.objectives as pkg
  return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in SHARED)


def load(name: str):
  """Imports mimjax.objectives.<name>; a clear error names the valid choices."""
  if name not in available():
    raise ValueError(f'config.objective={name!r}: expected one of {available()}')
  return importlib.import_module(f'mimjax.objectives.{name}')
