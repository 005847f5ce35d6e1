"""Durations in one vocabulary: `<name>_steps`, `<name>_epochs` or `<name>_examples` → steps."""

from typing import Optional

import ml_collections


def resolve_steps(name: str, config: ml_collections.ConfigDict, num_examples: int,
                  default: Optional[int] = None) -> int:
  """Steps for duration `name` from exactly one of config.{name}_{steps,epochs,examples}."""
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
  examples = value * num_examples if key.endswith('_epochs') else value
  return int(round(examples / config.batch_size))
