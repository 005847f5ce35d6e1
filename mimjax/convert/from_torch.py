"""Import PyTorch checkpoints (timm ViT, official MAE) as mimjax params and configs.

Every import is all-or-nothing: missing keys, unexpected keys and wrong shapes are collected
and reported in one error; nothing is written unless the whole state dict maps.
"""

import math
import os
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimjax.convert import keymap
from mimjax.convert import to_torch
from mimjax.models import layout, segment_bias
from mimjax.models import vit as vit_lib

PREFIXES = ('module.', 'backbone.')  # DDP / DINO-style wrappers
IGNORED = ('head.weight', 'head.bias')  # a classifier head is not part of the encoder
# Official MAE decoder: 512 wide, 16 heads (models_mae.py, every size). Heads are not in the
# shapes: a 512-wide decoder without mimjax metadata is taken to be the official one.
MAE_DECODER_HEADS = 16
MAE_DECODER_WIDTH = 512
# Top-level entries of training checkpoints, tried in this order when --checkpoint_key is not
# given: DINO's EMA teacher (what its eval scripts load), MAE/DeiT 'model', 'state_dict'.
AUTO_KEYS = ('teacher', 'model', 'state_dict')
METADATA_KEY = 'mimjax'  # {'num_heads': ..., 'decoder_num_heads': ...} written by our export


class TorchCheckpoint(NamedTuple):
  """A read checkpoint: flat float32 encoder/MAE state dict, head counts it records, notes."""
  state_dict: dict[str, np.ndarray]
  heads: dict[str, int]
  notes: list[str]


def _torch_load(path: str) -> Any:
  """torch.load with weights_only=True; official training checkpoints (MAE misc.save_model,
  DINO main_dino) pickle their argparse.Namespace under 'args': that one class is allowed."""
  import argparse
  import torch
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pickle errors come in many types; name the file once
    # torch's message is a page of advice (including to retry with weights_only=False, which
    # would run the file's code); keep the line that says what was refused.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    facts = [l for l in lines if 'weights_only' not in l and not l.startswith(
        ('Weights only load failed', 'Check the documentation', 'Please file an issue'))]
    why = (facts or lines)[0].removeprefix('WeightsUnpickler error:').strip()
    raise ValueError(f'{path}: cannot read as a torch checkpoint (weights_only=True, '
                     f'argparse.Namespace allowed): {why}') from None


def read_checkpoint(path: str, checkpoint_key: Optional[str] = None) -> TorchCheckpoint:
  """`.safetensors` or torch pickle → flat {key: float32 array} plus recorded head counts.

  A training checkpoint's entry is `checkpoint_key` if given, else the first of AUTO_KEYS it
  holds. `module.` prefixes are stripped; a DINO MultiCropWrapper (`backbone.` + `head.`)
  keeps its backbone only, as DINO's eval scripts do.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: checkpoint not found')
  heads: dict[str, int] = {}
  if path.endswith('.safetensors'):
    from safetensors import safe_open
    from safetensors.numpy import load_file
    try:
      raw: Any = load_file(path)
    except Exception as e:  # truncated, or another format under a .safetensors name
      raise ValueError(f'{path}: cannot read as .safetensors ({type(e).__name__}: '
                       f'{str(e).splitlines()[0] if str(e) else ""}); expected a complete '
                       'safetensors file') from e
    with safe_open(path, 'np') as f:
      meta = f.metadata() or {}
    heads = {k[len(METADATA_KEY) + 1:]: int(v) for k, v in meta.items()
             if k.startswith(METADATA_KEY + '.')}
  else:
    raw = _torch_load(path)
  if isinstance(raw, dict) and isinstance(raw.get(METADATA_KEY), dict):
    heads = {k: int(v) for k, v in raw[METADATA_KEY].items()}
  entries = [k for k, v in raw.items() if isinstance(v, dict)] if isinstance(raw, dict) else []
  if checkpoint_key is not None:
    if checkpoint_key not in entries:
      raise ValueError(f'{path}: --checkpoint_key {checkpoint_key!r} not found; the '
                       f'checkpoint holds the entries {entries}')
    raw = raw[checkpoint_key]
  else:
    for key in AUTO_KEYS:
      if key in entries:
        raw = raw[key]
        break
  if not isinstance(raw, dict):
    raise ValueError(f'{path}: expected a state dict (or {{"model": state_dict}}), '
                     f'got {type(raw).__name__}')
  notes = []
  names = {}
  for key in raw:
    name = key
    while name.startswith('module.'):
      name = name[len('module.'):]
    names[key] = name
  if any(n.startswith('backbone.') for n in names.values()):
    dropped = sorted(n for n in names.values() if not n.startswith('backbone.'))
    if dropped:
      notes.append(f'ignored {len(dropped)} keys outside backbone. (e.g. {dropped[0]}: the DINO '
                   'projection head, not part of the encoder)')
    names = {k: n[len('backbone.'):] for k, n in names.items() if n.startswith('backbone.')}
  out: dict[str, np.ndarray] = {}
  bad = []
  for key, name in names.items():
    value = raw[key]
    if name in out:
      raise ValueError(f'{path}: keys collide after stripping {PREFIXES}: {name!r}')
    if hasattr(value, 'detach'):  # torch tensor (bf16 has no numpy dtype → via float32)
      value = value.detach().float().numpy()
    if not isinstance(value, np.ndarray):
      bad.append(key)
      continue
    out[name] = value.astype(np.float32)
  if bad:
    raise ValueError(f'{path}: entries that are not tensors: {bad}; expected a state dict')
  return TorchCheckpoint(out, heads, notes)


def load_torch_checkpoint(path: str, checkpoint_key: Optional[str] = None
                          ) -> dict[str, np.ndarray]:
  """The state dict of `read_checkpoint`."""
  return read_checkpoint(path, checkpoint_key).state_dict


def heads_from(name: str, given: Optional[int], recorded: dict[str, int]) -> Optional[int]:
  """A head count from the flag or the file's metadata; both given and different → error."""
  if given is not None and name in recorded and int(given) != recorded[name]:
    raise ValueError(f'--{name} {given} contradicts the checkpoint, which records '
                     f'{name}={recorded[name]} (written by mimjax.convert)')
  return given if given is not None else recorded.get(name)


def _shape(sd: dict, key: str, path: str = 'checkpoint') -> tuple[int, ...]:
  if key not in sd:
    raise ValueError(f'{path}: missing key {key!r} needed to infer the model '
                     f'(found {len(sd)} keys, e.g. {sorted(sd)[:8]})')
  return tuple(sd[key].shape)


def _depth(sd: dict, prefix: str) -> int:
  ids = {int(k[len(prefix):].split('.')[0]) for k in sd if k.startswith(prefix)}
  return max(ids) + 1 if ids else 0


def infer_model_config(state_dict: dict[str, np.ndarray], *, variant: Optional[str] = None,
                       image_size: Optional[int] = None, num_heads: Optional[int] = None,
                       pos_embed: Optional[str] = None) -> ml_collections.ConfigDict:
  """config.model for a timm-layout encoder; sizes from shapes, checked against any given.

  Heads cannot be read from shapes: they come from `num_heads`, `variant`, or the standard
  size with the same width (e.g. 384 → S → 6). `pos_embed` defaults to 'sincos' when the
  stored table equals MAE's fixed sincos table, else 'learned'.
  """
  width = _shape(state_dict, 'cls_token')[-1]
  conv = _shape(state_dict, 'patch_embed.proj.weight')
  patch = conv[-1]
  depth = _depth(state_dict, 'blocks.')
  mlp = _shape(state_dict, 'blocks.0.mlp.fc1.weight')[0]
  prefix = 1 + (state_dict['reg_token'].shape[1] if 'reg_token' in state_dict else 0)
  rows = _shape(state_dict, 'pos_embed')[1] - prefix
  grid = math.isqrt(rows)
  if grid * grid != rows:
    raise ValueError(f'pos_embed has {rows} patch rows (+{prefix} prefix); expected a square grid')
  found = dict(width=width, depth=depth, mlp_dim=mlp, patch_size=patch)
  if image_size is not None and int(image_size) != grid * patch:
    raise ValueError(f'--image_size {image_size} does not match the checkpoint: pos_embed has a '
                     f'{grid}x{grid} grid of {patch}-px patches = {grid * patch} px')
  overrides: dict[str, Any] = {}
  if variant is not None:
    dims = vit_lib.decode_variant(variant)
    wrong = {k: (dims[k], v) for k, v in found.items() if dims[k] != v}
    if wrong:
      raise ValueError(f'--variant {variant} does not match the checkpoint shapes '
                       f'(key: expected, found): {wrong}')
  else:
    by_width = [n for n, (w, *_) in vit_lib.VARIANTS.items() if w == width]
    if by_width:
      name = by_width[0]
    elif num_heads is None:
      raise ValueError(f'cannot infer num_heads for width {width} (no standard ViT size has '
                       f'it); pass --num_heads or --variant')
    else:  # nearest standard size names the timm base model; every size is overridden
      name = min(vit_lib.VARIANTS, key=lambda n: abs(vit_lib.VARIANTS[n][0] - width))
    variant = f'{name}/{patch}'
    dims = vit_lib.decode_variant(variant)
    overrides = {k: v for k, v in found.items() if dims[k] != v}
  if num_heads is not None and int(num_heads) != dims['num_heads']:
    overrides['num_heads'] = int(num_heads)
  heads = overrides.get('num_heads', dims['num_heads'])
  if width % heads:
    raise ValueError(f'width {width} is not divisible by num_heads {heads}')
  if pos_embed is None:
    sincos = vit_lib.sincos_pos_embed_2d(width, grid, cls_token=True) if prefix == 1 else None
    stored = state_dict['pos_embed'][0]
    pos_embed = 'sincos' if sincos is not None and np.allclose(stored, sincos, atol=1e-5) \
        else 'learned'
  config = ml_collections.ConfigDict({
      'variant': variant, 'image_size': grid * patch, 'pos_embed': pos_embed, 'pool': 'cls',
      'dtype': 'float32', 'attention': 'xla', 'remat': False, 'drop_path': 0.0,
      'width': None, 'depth': None, 'num_heads': None, 'mlp_dim': None, 'patch_size': None,
      'segment_bias': segment_bias.default_config(),
  })
  for key, value in overrides.items():
    config[key] = int(value)
  if prefix > 1:
    config.num_prefix_tokens = prefix
  return config


def infer_mae_config(state_dict: dict[str, np.ndarray], *,
                     decoder_num_heads: Optional[int] = None,
                     **model_kwargs) -> ml_collections.ConfigDict:
  """Config {objective: 'mae', model: {..., decoder}} for an official MAE state dict.

  decoder_num_heads None: the official 16 for the official 512-wide decoder, else an error
  asking for it (heads are not in the shapes)."""
  model = infer_model_config(state_dict, **model_kwargs)
  dec_width = _shape(state_dict, 'decoder_embed.weight')[0]
  if decoder_num_heads is None:
    if dec_width != MAE_DECODER_WIDTH:
      raise ValueError(f'the decoder is {dec_width} wide (the official MAE decoder is '
                       f'{MAE_DECODER_WIDTH} wide, 16 heads) and the checkpoint does not record '
                       'its head count: pass --decoder_num_heads')
    decoder_num_heads = MAE_DECODER_HEADS
  model.decoder = ml_collections.ConfigDict({
      'width': dec_width, 'depth': _depth(state_dict, 'decoder_blocks.'),
      'num_heads': int(decoder_num_heads),
      'mlp_dim': _shape(state_dict, 'decoder_blocks.0.mlp.fc1.weight')[0]})
  if dec_width % int(decoder_num_heads):
    raise ValueError(f'decoder width {dec_width} not divisible by --decoder_num_heads '
                     f'{decoder_num_heads}')
  return ml_collections.ConfigDict({
      'objective': 'mae', 'model': model, 'mask_ratio': 0.75, 'masking': 'random',
      'target': 'pixel', 'norm_pix': True})


def unrolled(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config (a whole config or its `model`) with unrolled blocks: the key maps name each
  block; an import into a scanning config stacks them afterwards (`layout.to_layout`)."""
  out = ml_collections.ConfigDict(config.to_dict())
  (out.model if 'model' in out else out).scan_layers = False
  return out


def _vit_shapes(model_config: ml_collections.ConfigDict) -> dict:
  size = int(model_config.image_size)
  shapes = jax.eval_shape(lambda: vit_lib.ViT(unrolled(model_config)).init(
      jax.random.key(0), jnp.zeros((1, size, size, 3))))['params']
  return {p: tuple(s.shape) for p, s in keymap.flatten(shapes).items()}


def _import(state_dict: dict[str, np.ndarray], entries: list[keymap.Entry],
            flax_shapes: dict, what: str, hint: str = '') -> tuple[dict, list[str]]:
  """Maps a state dict onto `entries`; one error listing every problem. → (params, ignored)."""
  wanted = {e.torch_key for e in entries}
  missing = sorted(wanted - set(state_dict))
  ignored = sorted(k for k in state_dict if k not in wanted and k in IGNORED)
  unexpected = sorted(k for k in state_dict if k not in wanted and k not in IGNORED)
  wrong = []
  for e in entries:
    if e.torch_key in state_dict:
      want = keymap.torch_shape(flax_shapes[e.flax_path], e.kind)
      if tuple(state_dict[e.torch_key].shape) != want:
        wrong.append(f'{e.torch_key}: expected {want}, got {tuple(state_dict[e.torch_key].shape)}')
  if missing or unexpected or wrong:
    parts = [f'{what}: the checkpoint does not match the model']
    if missing:
      parts.append(f'missing keys ({len(missing)}): {missing}')
    if unexpected:
      parts.append(f'unexpected keys ({len(unexpected)}): {unexpected}')
    if wrong:
      parts.append(f'wrong shapes ({len(wrong)}): {wrong}')
    if hint:
      parts.append(hint)
    raise ValueError('\n  '.join(parts))
  flat = {e.flax_path: keymap.torch_to_flax_array(state_dict[e.torch_key], e.kind)
          for e in entries}
  return keymap.unflatten(flat), ignored


def _hint(state_dict: dict) -> str:
  if 'mask_token' in state_dict or any(k.startswith('decoder_') for k in state_dict):
    return 'hint: this looks like a full MAE checkpoint (mask_token/decoder_*): use --from mae'
  if 'fc_norm.weight' in state_dict and 'norm.weight' not in state_dict:
    return ('hint: a global-pool fine-tuned model (fc_norm instead of norm) is not an encoder '
            'checkpoint mimjax can import')
  return ''


def timm_to_vit(state_dict: dict[str, np.ndarray],
                model_config: ml_collections.ConfigDict) -> dict:
  """timm ViT state dict → ViT encoder params (a `head.*` classifier is ignored)."""
  params, _ = timm_to_vit_with_notes(state_dict, model_config)
  return params


def timm_to_vit_with_notes(state_dict: dict[str, np.ndarray],
                           model_config: ml_collections.ConfigDict) -> tuple[dict, list[str]]:
  """`timm_to_vit` plus the list of ignored keys (for the CLI to print)."""
  entries = to_torch.vit_entries(model_config)
  params, ignored = _import(state_dict, entries, _vit_shapes(model_config), 'timm import',
                            _hint(state_dict))
  return layout.to_layout(params, layout.scans(model_config)), ignored


def torch_to_mae(state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> dict:
  """Official MAE state dict → {'encoder': ..., 'decoder': ...} params (blocks stacked when
  config.model.scan_layers)."""
  from mimjax.objectives import mae as mae_lib  # objectives import models; keep it local
  if not any(k.startswith('decoder_') for k in state_dict):
    raise ValueError('MAE import: the checkpoint has no decoder_* keys (released '
                     'mae_pretrain_vit_*.pth hold only the encoder): use --from timm')
  size = int(config.model.image_size)
  n = (size // vit_lib.model_dims(config.model)['patch_size']) ** 2
  ids = jnp.arange(n, dtype=jnp.int32)[None]
  shapes = jax.eval_shape(lambda: mae_lib.MAE(unrolled(config)).init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), ids, ids))['params']
  entries = (to_torch.vit_entries(config.model, ('encoder',))
             + keymap.decoder_entries(int(config.model.decoder.depth), ('decoder',)))
  flax_shapes = {p: tuple(s.shape) for p, s in keymap.flatten(shapes).items()}
  params, _ = _import(state_dict, entries, flax_shapes, 'MAE import')
  return layout.to_layout(params, layout.scans(config.model))
