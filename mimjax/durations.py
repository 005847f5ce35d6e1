"""Durations in one vocabulary: `<name>_steps`, `<name>_epochs` or `<name>_examples` → steps."""

import re
from typing import Optional, Sequence

import ml_collections


def resolve_steps(name: str, config: ml_collections.ConfigDict, num_examples: int,
                  default: Optional[int] = None) -> int:
  """Steps for duration `name` from exactly one of config.{name}_{steps,epochs,examples};
  epochs count N // batch_size steps each (drop_last), examples / batch_size rounded."""
  set_keys = [k for k in (f'{name}_steps', f'{name}_epochs', f'{name}_examples')
              if config.get(k) is not None]
  if len(set_keys) > 1:
    raise ValueError(f'config: set only one of {set_keys} (the others must be None)')
  if not set_keys:
    if default is None:
      raise ValueError(f'config: one of {name}_steps / {name}_epochs / {name}_examples is required')
    return default
  key = set_keys[0]
  value = config[key]
  if value < 0:
    raise ValueError(f'config.{key}={value}: must be >= 0')
  if key.endswith('_steps'):
    return int(value)
  if key.endswith('_epochs'):
    # MAE/DINO: an epoch is len(DataLoader(drop_last=True)) = N // batch iterations, and the
    # loader (data/pipeline.py) drops the same remainder.
    per_epoch = num_examples // config.batch_size
    if per_epoch < 1:
      raise ValueError(f'config.{key}={value}: config.batch_size={config.batch_size} exceeds '
                       f'the {num_examples} training examples (an epoch would have 0 steps)')
    return int(round(value * per_epoch))
  return int(round(value / config.batch_size))


UNITS = ('steps', 'epochs', 'examples')


def apply_cli_overrides(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
  """`--config.total_steps=N` on the command line unsets total_epochs/total_examples (and
  likewise for every duration name), so overriding a config's duration never conflicts."""
  for arg in argv:
    m = re.match(r'--config\.(\w+)_(steps|epochs|examples)=', arg)
    if not m:
      continue
    name, unit = m.groups()
    for other in UNITS:
      key = f'{name}_{other}'
      if other != unit and key in config and not any(a.startswith(f'--config.{key}=') for a in argv):
        with config.ignore_type():
          config[key] = None
