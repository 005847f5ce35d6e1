"""Start-up validation of a training config: one clear error naming the key."""

import fnmatch
import json
import math

import ml_collections

from mimjax.data import pipeline
from mimjax.objectives import base as objectives

POSITIVE_INTS = ('batch_size', 'grad_accum', 'log_every', 'checkpoint_every', 'keep_checkpoints')

# (dotted-key pattern, low, high, low included, high included): the range of every numeric key
# whose meaning bounds it. Every number, listed or not, must also be finite (a NaN lr used to
# run 99 NaN steps). The first matching pattern applies.
RANGES = (
    ('optim.lr', 0, math.inf, False, False),
    ('optim.base_lr', 0, math.inf, False, False),
    ('optim.eps', 0, math.inf, False, False),
    ('optim.clip_*', 0, math.inf, False, False),
    ('optim.layer_decay', 0, 1, False, True),
    ('optim.b[12]', 0, 1, True, False),
    ('*momentum*', 0, 1, True, True),
    ('finetune.ema_decay', 0, 1, True, True),
    ('*temp', 0, math.inf, False, False),     # DINO / distillation temperatures
    ('*.temperature', 0, math.inf, False, False),
    ('*.bn_eps', 0, math.inf, False, False),
    ('model.drop_path', 0, 1, True, False),
    ('finetune.*prob', 0, 1, True, True),
    ('finetune.label_smoothing', 0, 1, True, False),
    ('optim.*', 0, math.inf, True, False),    # weight decay (and its end), min_lr, momentum...
    ('*_steps', 0, math.inf, True, False),
    ('*_epochs', 0, math.inf, True, False),
    ('*_examples', 0, math.inf, True, False),
)


def _numbers(config: ml_collections.ConfigDict) -> dict:
  """{'optim.lr': value} for every number in the config (booleans aside)."""
  from mimjax.workdir import flatten
  return {k: v for k, v in flatten(json.loads(config.to_json_best_effort())).items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_numbers(config: ml_collections.ConfigDict) -> None:
  """ValueError('config.<key>=<value>: expected ...') for the first number that is NaN/Inf or
  outside its range (`RANGES`)."""
  for key, value in sorted(_numbers(config).items()):
    if not math.isfinite(value):
      raise ValueError(f'config.{key}={value}: expected a finite number')
    for pattern, low, high, low_in, high_in in RANGES:
      if fnmatch.fnmatchcase(key, pattern):
        above = value >= low if low_in else value > low
        below = value <= high if high_in else value < high
        if not (above and below):
          bounds = f'{"[" if low_in else "("}{low}, {"inf" if high == math.inf else high}' \
                   f'{"]" if high_in else ")"}'
          raise ValueError(f'config.{key}={value}: expected a value in {bounds}')
        break


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError('config.<key>=...: expected ...') for the first bad value."""
  for key in ('objective', 'model', 'data', 'optim', 'seed') + POSITIVE_INTS:
    if key not in config:
      raise ValueError(f'config.{key} is missing')
  objectives.load(config.objective)
  check_numbers(config)
  for key in POSITIVE_INTS:
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f'config.{key}={value!r}: expected a positive integer')
  if config.batch_size % config.grad_accum:
    raise ValueError(f'config.batch_size={config.batch_size} must be divisible by '
                     f'config.grad_accum={config.grad_accum}')
  ratio = config.get('mask_ratio')
  if ratio is not None and not 0.0 <= ratio < 1.0:
    raise ValueError(f'config.mask_ratio={ratio}: expected a value in [0, 1)')
  from mimjax.models.vit import DTYPES, model_dims
  if 'pretrained' not in config:  # eval configs take the model from the pretrained workdir
    model_dims(config.model)
  if config.model.get('dtype', 'float32') not in DTYPES:
    raise ValueError(f'config.model.dtype={config.model.dtype!r}: expected one of {list(DTYPES)}')
  from mimjax.models.attention import IMPLEMENTATIONS
  if config.model.get('attention', 'xla') not in IMPLEMENTATIONS:
    raise ValueError(f'config.model.attention={config.model.attention!r}: expected one of '
                     f'{IMPLEMENTATIONS}')
  pipeline.validate_data_config(config.data)
