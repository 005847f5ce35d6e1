"""Flax ↔ PyTorch parameter names and per-tensor layout transforms (timm ViT, official MAE).

A mapping is a list of `Entry(flax_path, torch_key, kind)`; `kind` says how the tensor layout
differs: 'linear' (torch weight = kernel.T), 'conv' (Flax (kh, kw, I, O) ↔ torch (O, I, kh, kw))
or 'same'. LayerNorm `scale` ↔ `weight` is a rename only.
"""

from typing import Any, NamedTuple

import numpy as np

Path = tuple[str, ...]

# Encoder sub-modules that have no timm counterpart; exporting drops them with a note.
DROPPED_MODULES = {
    'segment_bias': 'MRE segment-bias scalars u_pos/u_neg (timm has no attention-logit bias; '
                    'the exported model is the plain ViT, which is what MRE evaluates)',
}


class Entry(NamedTuple):
  flax_path: Path
  torch_key: str
  kind: str  # 'linear' | 'conv' | 'same'


def _dense(flax: Path, torch: str) -> list[Entry]:
  return [Entry(flax + ('kernel',), f'{torch}.weight', 'linear'),
          Entry(flax + ('bias',), f'{torch}.bias', 'same')]


def _norm(flax: Path, torch: str) -> list[Entry]:
  return [Entry(flax + ('scale',), f'{torch}.weight', 'same'),
          Entry(flax + ('bias',), f'{torch}.bias', 'same')]


def block_entries(flax: Path, torch: str) -> list[Entry]:
  """One pre-norm transformer block (fused qkv: rows [q; k; v], head-major, in both)."""
  return (_norm(flax + ('norm1',), f'{torch}.norm1')
          + _dense(flax + ('attn', 'qkv'), f'{torch}.attn.qkv')
          + _dense(flax + ('attn', 'proj'), f'{torch}.attn.proj')
          + _norm(flax + ('norm2',), f'{torch}.norm2')
          + _dense(flax + ('mlp', 'fc1'), f'{torch}.mlp.fc1')
          + _dense(flax + ('mlp', 'fc2'), f'{torch}.mlp.fc2'))


def encoder_entries(depth: int, num_reg_tokens: int = 0, prefix: Path = ()) -> list[Entry]:
  """ViT encoder ↔ timm VisionTransformer (class token, no head); keys as in REFERENCE §10."""
  out = [Entry(prefix + ('patch_embed', 'proj', 'kernel'), 'patch_embed.proj.weight', 'conv'),
         Entry(prefix + ('patch_embed', 'proj', 'bias'), 'patch_embed.proj.bias', 'same'),
         Entry(prefix + ('cls_token',), 'cls_token', 'same'),
         Entry(prefix + ('pos_embed',), 'pos_embed', 'same')]
  if num_reg_tokens:
    # Extra prefix (proxy/register) tokens ↔ timm `reg_token` (1, k, D).
    out.append(Entry(prefix + ('reg_token',), 'reg_token', 'same'))
  for i in range(depth):
    out += block_entries(prefix + (f'blocks_{i}',), f'blocks.{i}')
  return out + _norm(prefix + ('norm',), 'norm')


def decoder_entries(depth: int, prefix: Path = ('decoder',)) -> list[Entry]:
  """MAEDecoder ↔ official MAE `decoder_*` keys and `mask_token`."""
  out = (_dense(prefix + ('embed',), 'decoder_embed')
         + [Entry(prefix + ('mask_token',), 'mask_token', 'same'),
            Entry(prefix + ('pos_embed',), 'decoder_pos_embed', 'same')])
  for i in range(depth):
    out += block_entries(prefix + (f'blocks_{i}',), f'decoder_blocks.{i}')
  return out + _norm(prefix + ('norm',), 'decoder_norm') + _dense(prefix + ('pred',), 'decoder_pred')


def flax_to_torch_array(x: np.ndarray, kind: str) -> np.ndarray:
  """Flax layout → torch layout (float32, C-contiguous)."""
  x = np.asarray(x, dtype=np.float32)
  if kind == 'linear':
    x = x.T
  elif kind == 'conv':
    x = x.transpose(3, 2, 0, 1)
  return np.ascontiguousarray(x)


def torch_to_flax_array(x: np.ndarray, kind: str) -> np.ndarray:
  """Torch layout → Flax layout (float32, C-contiguous)."""
  x = np.asarray(x, dtype=np.float32)
  if kind == 'linear':
    x = x.T
  elif kind == 'conv':
    x = x.transpose(2, 3, 1, 0)
  return np.ascontiguousarray(x)


def torch_shape(flax_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  """The torch shape of a Flax tensor of `flax_shape`."""
  if kind == 'linear':
    return tuple(reversed(flax_shape))
  if kind == 'conv':
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  return tuple(flax_shape)


def flatten(tree: Any, prefix: Path = ()) -> dict[Path, Any]:
  """Nested dicts → {path tuple: leaf}."""
  if hasattr(tree, 'items'):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, prefix + (str(key),)))
    return out
  return {prefix: tree}


def unflatten(flat: dict[Path, Any]) -> dict:
  """{path tuple: leaf} → nested dicts."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out
