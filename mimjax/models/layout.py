"""The two layouts of a block stack's params: unrolled `blocks_{i}/...` and scanned `blocks/...`.

With `model.scan_layers` the encoder (and MAE decoder, and SemanticMIM `extra_layers`) blocks
are one `nn.scan`, whose params are the unrolled ones stacked on a leading layer axis under the
stack's name. These two functions convert any tree in either direction: params, gradients and
optimizer states alike (a dict holding `blocks_0 … blocks_{n-1}` is rewritten wherever it
sits, inside dicts, lists, tuples and named tuples). Every place where layouts meet —
checkpoint restore, `init_from`, timm/MAE conversion — goes through them.
"""

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# The names of the block stacks the models scan (encoder/decoder blocks, SemanticMIM's
# [MASK] stream).
STACKS = ('blocks', 'extra_layers')


def _map_dicts(tree: Any, fn) -> Any:
  """Applies fn to every dict of tree, bottom-up, through any pytree nodes (optax states)."""
  if isinstance(tree, dict):
    return fn({k: _map_dicts(v, fn) for k, v in tree.items()})
  leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: isinstance(x, dict))
  if treedef.num_nodes == 1:  # tree is a leaf itself
    return tree
  return treedef.unflatten([_map_dicts(x, fn) if isinstance(x, dict) else x for x in leaves])


def _stack(*leaves: Any) -> Any:
  """Leaves of layers 0…n-1 → one leaf with a leading layer axis (numpy stays numpy on the
  host, shapes stay abstract)."""
  a = leaves[0]
  if isinstance(a, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(a.shape), a.dtype)
  if isinstance(a, np.ndarray):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _row(a: Any, i: int) -> Any:
  """Layer i of a stacked leaf."""
  if isinstance(a, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(a.shape[1:]), a.dtype)
  return a[i]


def _layer_index(key: str, names: Sequence[str]):
  m = re.fullmatch(r'(.+)_(\d+)', key) if isinstance(key, str) else None
  return (m.group(1), int(m.group(2))) if m and m.group(1) in names else None


def stack_blocks(tree: Any, names: Sequence[str] = STACKS) -> Any:
  """Unrolled → scanned: every `{name}_0 … {name}_{n-1}` in a dict becomes `{name}` with each
  leaf stacked on a new leading axis (a tree already scanned comes back unchanged)."""
  def fn(d: dict) -> dict:
    found: dict = {}
    for k in d:
      hit = _layer_index(k, names)
      if hit:
        found.setdefault(hit[0], {})[hit[1]] = k
    if not found:
      return d
    out = {k: v for k, v in d.items() if not _layer_index(k, names)}
    for name, layers in found.items():
      if sorted(layers) != list(range(len(layers))) or name in d:
        raise ValueError(f'{name}_i params are not layers 0..{len(layers) - 1} '
                         f'(found {sorted(layers)}{" and a stacked " + name if name in d else ""})')
      subtrees = [d[layers[i]] for i in range(len(layers))]
      out[name] = jax.tree.map(_stack, *subtrees)
    return out
  return _map_dicts(tree, fn)


def unstack_blocks(tree: Any, names: Sequence[str] = STACKS) -> Any:
  """Scanned → unrolled: every `{name}` in a dict whose leaves carry a leading layer axis of
  length n becomes `{name}_0 … {name}_{n-1}` (a tree already unrolled comes back unchanged)."""
  def fn(d: dict) -> dict:
    out = dict(d)
    for name in names:
      if name not in d or not isinstance(d[name], dict):
        continue
      sizes = {leaf.shape[0] for leaf in jax.tree.leaves(d[name]) if hasattr(leaf, 'shape')}
      if len(sizes) != 1:
        raise ValueError(f'stacked {name!r}: leaves disagree on the layer axis ({sorted(sizes)})')
      stack = out.pop(name)
      for i in range(sizes.pop()):
        out[f'{name}_{i}'] = jax.tree.map(lambda a, i=i: _row(a, i), stack)
    return out
  return _map_dicts(tree, fn)


def is_scanned(tree: Any, names: Sequence[str] = STACKS) -> bool:
  """Whether tree holds a scanned stack (a `{name}` dict) anywhere."""
  found = []
  _map_dicts(tree, lambda d: found.append(any(isinstance(d.get(n), dict) for n in names)) or d)
  return any(found)


def to_layout(tree: Any, scanned: bool) -> Any:
  """tree in the scanned (True) or unrolled (False) layout, whichever it is in now."""
  return stack_blocks(tree) if scanned else unstack_blocks(tree)


def scans(model_config: ml_collections.ConfigDict) -> bool:
  """`model.scan_layers`: whether this model's block stacks are scanned."""
  return bool(model_config.get('scan_layers', False))


def is_stacked_path(name: str, names: Sequence[str] = STACKS) -> bool:
  """Whether a '/'-joined param path lies in a scanned stack (its leaf has a layer axis)."""
  return any(part in names for part in name.split('/'))


def per_layer_ndim(name: str, ndim: int) -> int:
  """The rank a param has in one layer: its rank less the layer axis of a scanned stack (rules
  such as 'no weight decay for ≤1-D tensors' are about one layer's tensor)."""
  return ndim - 1 if is_stacked_path(name) else ndim


def unrolled_view(fn):
  """Wraps fn(tree, *a, **kw) → tree so that it sees the unrolled layout (`blocks_{i}` names)
  and its result comes back in the layout of the tree it was given."""
  def wrapped(tree, *args, **kwargs):
    scanned = is_scanned(tree)
    out = fn(unstack_blocks(tree) if scanned else tree, *args, **kwargs)
    return stack_blocks(out) if scanned else out
  wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
  return wrapped
