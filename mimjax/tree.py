"""Parameter-tree paths: names for jax tree paths and regex matching on them (optimizer
groups, frozen/no-decay patterns, layer ids)."""

import re


def path_name(path: tuple) -> str:
  """'encoder/blocks_0/attn/qkv/kernel' for a jax tree path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def matches(name: str, patterns) -> bool:
  """True when any regex in `patterns` is found in the parameter name."""
  return any(re.search(p, name) for p in patterns)
