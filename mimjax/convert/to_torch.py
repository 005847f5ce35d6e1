"""Export Flax params to PyTorch: timm `VisionTransformer` state dicts and the official MAE layout.

Pure functions from (params, config) to `{torch key: np.ndarray}`; writing files and the
optional forward check (`verify_timm`) are separate so each can be tested alone.
"""

import os
import tempfile
from typing import Any, Callable, Optional

import ml_collections
import numpy as np

from mimjax import workdir
from mimjax.convert import keymap
from mimjax.models import layout
from mimjax.models import vit as vit_lib

# mimjax size name → timm size name; 'mu' (a CPU test size) is timm 'tiny' with overrides.
TIMM_SIZES = {'mu': 'tiny', 'Ti': 'tiny', 'S': 'small', 'B': 'base', 'L': 'large', 'H': 'huge'}
_TIMM_DEFAULT = {'tiny': 'Ti', 'small': 'S', 'base': 'B', 'large': 'L', 'huge': 'H'}


def num_reg_tokens(model_config: ml_collections.ConfigDict) -> int:
  """Prefix tokens beyond cls (proxy / register tokens), exported as timm `reg_token`."""
  return int(model_config.get('num_prefix_tokens', 1) or 1) - 1


def timm_model_name_and_kwargs(model_config: ml_collections.ConfigDict) -> tuple[str, dict]:
  """(timm model name, create_model kwargs) building the same ViT as `model_config`, no head.

  The name is the registered timm model of that size/patch/image size when there is one
  (e.g. 'vit_base_patch16_224'), else the size's base model with `patch_size`/`img_size`
  kwargs. Non-standard widths/depths/heads/MLP ratios (e.g. 'mu', or `depth` overrides)
  become kwargs, so `timm.create_model(name, **kwargs)` always matches.
  """
  import timm  # torch-side dependency: only imported where needed
  dims = vit_lib.model_dims(model_config)
  size = TIMM_SIZES[model_config.variant.split('/')[0]]
  p, img = dims['patch_size'], int(model_config.image_size)
  kwargs: dict[str, Any] = {}
  name = f'vit_{size}_patch{p}_{img}'
  if not timm.is_model(name):
    base_patch = 14 if size == 'huge' else 16
    name = f'vit_{size}_patch{base_patch}_224'
    if p != base_patch:
      kwargs['patch_size'] = p
    if img != 224:
      kwargs['img_size'] = img
  width, depth, heads, _ = vit_lib.VARIANTS[_TIMM_DEFAULT[size]]
  if dims['width'] != width:
    kwargs['embed_dim'] = dims['width']
  if dims['depth'] != depth:
    kwargs['depth'] = dims['depth']
  if dims['num_heads'] != heads:
    kwargs['num_heads'] = dims['num_heads']
  if dims['mlp_dim'] != 4 * dims['width']:
    kwargs['mlp_ratio'] = dims['mlp_dim'] / dims['width']
  if num_reg_tokens(model_config):
    kwargs['reg_tokens'] = num_reg_tokens(model_config)
  kwargs['num_classes'] = 0
  return name, kwargs


def _export(flat: dict, entries: list[keymap.Entry], what: str) -> dict[str, np.ndarray]:
  missing = [e.flax_path for e in entries if e.flax_path not in flat]
  if missing:
    raise ValueError(f'{what}: params lack {len(missing)} expected tensors: '
                     f'{["/".join(p) for p in missing]}')
  return {e.torch_key: keymap.flax_to_torch_array(flat[e.flax_path], e.kind) for e in entries}


def vit_entries(model_config: ml_collections.ConfigDict,
                prefix: keymap.Path = ()) -> list[keymap.Entry]:
  """Key map of the ViT encoder described by `model_config` (under `prefix` in the tree)."""
  return keymap.encoder_entries(vit_lib.model_dims(model_config)['depth'],
                                num_reg_tokens(model_config), prefix)


def vit_to_timm(params: Any, model_config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """ViT encoder params (either block layout) → timm state dict (float32, no head); see
  `dropped_params`."""
  flat = keymap.flatten(layout.unstack_blocks(params))
  return _export(flat, vit_entries(model_config), 'vit_to_timm')


def dropped_params(params: Any, model_config: ml_collections.ConfigDict) -> list[str]:
  """Human-readable notes on encoder params that have no timm counterpart (not exported)."""
  mapped = {e.flax_path for e in vit_entries(model_config)}
  notes: dict[str, list[str]] = {}
  for path in keymap.flatten(layout.unstack_blocks(params)):
    if path not in mapped:
      notes.setdefault(path[0], []).append('/'.join(path))
  return [f'dropped {", ".join(paths)}: '
          + keymap.DROPPED_MODULES.get(top, 'no timm counterpart (e.g. SemanticMIM proxy '
                                            'modules); the export is the plain ViT encoder')
          for top, paths in sorted(notes.items())]


def mae_to_torch(params: Any, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Full MAE params {'encoder', 'decoder'} (either block layout) → official `models_mae`
  state dict."""
  if 'decoder' not in params or 'encoder' not in params:
    raise ValueError(f'mae_to_torch: expected params with "encoder" and "decoder", got '
                     f'{sorted(params)} (is this an MAE-family workdir?)')
  dec = config.model.get('decoder')
  if dec is None:
    raise ValueError('mae_to_torch: config.model.decoder is missing (not an MAE config)')
  flat = keymap.flatten(layout.unstack_blocks({'encoder': params['encoder'],
                                               'decoder': params['decoder']}))
  entries = (vit_entries(config.model, ('encoder',))
             + keymap.decoder_entries(int(dec.depth), ('decoder',)))
  return _export(flat, entries, 'mae_to_torch')


def timm_state_dict_of_mae(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops `mask_token` and `decoder_*` (timm would take a dict with mask_token for DINOv2)."""
  return {k: v for k, v in state_dict.items()
          if k != 'mask_token' and not k.startswith('decoder_')}


def _atomic_write(path: str, write) -> None:
  """Calls write(tmp_path) then renames, so a failed write never leaves a partial `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', dir=directory)
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, workdir.file_mode())  # mkstemp made it 0600: other users could not read it
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def classifier_to_timm(config: ml_collections.ConfigDict, params: Any,
                       state: Any) -> tuple[dict[str, np.ndarray], dict, list[str]]:
  """A fine-tuned or linear-probe workdir's classifier → (timm head tensors, timm kwargs, encoder
  keys timm does not have).

  Fine-tuning 'mean' (MAE global pool) is timm global_pool='avg' with `fc_norm` and no final
  `norm`; 'cls' is global_pool='token'. The probe's 'mean' (MAE global pool of the raw
  last-block tokens, then an untrained LayerNorm) is 'avg' with `fc_norm` weight 1, bias 0.
  The probe's BatchNorm(affine=False) is folded into the Linear: W' = W / s,
  b' = b − (μ / s)·W with s = √(var + 1e-6), since timm has no such layer.
  """
  objective = config.objective
  prefix = num_reg_tokens(config.model) + 1
  if objective == 'finetune':
    pool = config.finetune.pool
    head = params['head']
    kernel, bias = np.asarray(head['head']['kernel']), np.asarray(head['head']['bias'])
    fc_norm = head.get('fc_norm')
  elif objective == 'linear_probe':
    probe = _resolved_probe(config)
    pool = probe.pool
    if pool not in ('cls', 'mean'):
      # abmilp / attentive are trained poolers timm does not have.
      raise ValueError(f'config.probe.pool={pool!r} has no timm counterpart (only the cls and '
                       'mean probes do); export the pretrained encoder instead '
                       f'(--workdir {config.pretrained})')
    # timm reads the last block: the final norm for 'token', the raw tokens for 'avg' (as 'mean').
    norm, final_norm = probe.get('norm', 'bn'), probe.get('final_norm', True)
    if int(probe.get('layer', -1)) != -1 or (pool == 'cls' and (norm != 'bn' or not final_norm)):
      raise ValueError(f'config.probe (pool={pool!r}, layer={probe.get("layer")}, norm={norm!r}, '
                       f'final_norm={final_norm}) has no timm counterpart: timm reads the last '
                       'block through its final norm (token pool) or fc_norm (avg pool)')
    linear = params['head']['linear']
    k = np.asarray(linear['kernel'], np.float64)
    kernel, bias = k.astype(np.float32), np.asarray(linear['bias'], np.float32)
    if norm == 'bn':
      bn = state['batch_stats']['bn']
      scale = np.sqrt(np.asarray(bn['var'], np.float64) + 1e-6)
      kernel = (k / scale[:, None]).astype(np.float32)
      bias = (np.asarray(linear['bias'], np.float64)
              - (np.asarray(bn['mean'], np.float64) / scale) @ k).astype(np.float32)
    # 'mean' is MAE's global pool → its untrained fc_norm (weight 1, bias 0), as timm's 'avg'.
    width = k.shape[0]
    fc_norm = {'scale': np.ones(width, np.float32), 'bias': np.zeros(width, np.float32)}
  else:
    raise ValueError(f'objective {objective!r} has no classifier to export')
  if pool == 'cls' and prefix > 1:
    raise ValueError(f'{objective} pool=cls averages {prefix} prefix tokens; timm reads the '
                     'first token only, so this classifier has no timm counterpart')
  out = {'head.weight': keymap.flax_to_torch_array(kernel, 'linear'),
         'head.bias': keymap.flax_to_torch_array(bias, 'same')}
  kwargs: dict[str, Any] = {'num_classes': int(kernel.shape[-1])}
  dropped: list[str] = []
  if pool == 'mean':
    kwargs['global_pool'] = 'avg'  # timm then uses fc_norm and no final norm
    out['fc_norm.weight'] = keymap.flax_to_torch_array(fc_norm['scale'], 'same')
    out['fc_norm.bias'] = keymap.flax_to_torch_array(fc_norm['bias'], 'same')
    dropped = ['norm.weight', 'norm.bias']
  else:
    kwargs['global_pool'] = 'token'
  return out, kwargs, dropped


def _resolved_probe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A probe workdir's `config.probe` with pool / layer None filled as the probe filled them."""
  if config.probe.get('pool') is not None and config.probe.get('layer') is not None:
    return config.probe
  from mimjax.objectives import pretrained
  from mimjax.objectives import linear_probe
  pre_config, _ = pretrained.load_pretrained_config(config.pretrained)
  return linear_probe.resolve_probe(config.probe, pre_config)


def save_state_dict(state_dict: dict[str, np.ndarray], path: str, *,
                    wrap_model: bool = False, metadata: Optional[dict[str, int]] = None) -> None:
  """Writes `.safetensors` (flat) or a torch pickle (`{'model': sd}` if wrap_model) atomically.

  `metadata` (head counts, not inferable from shapes) goes into the safetensors header as
  'mimjax.<key>', or next to 'model' as {'mimjax': {...}}; a flat timm .pth has no room for it.
  """
  metadata = metadata or {}
  if path.endswith('.safetensors'):
    if wrap_model:
      raise ValueError(f'{path}: the MAE format is a torch pickle {{"model": ...}}; use .pth')
    from safetensors.numpy import save_file
    header = {f'mimjax.{k}': str(int(v)) for k, v in metadata.items()}
    _atomic_write(path, lambda tmp: save_file(state_dict, tmp, metadata=header))
    return
  import torch
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
  obj = {'model': tensors, 'mimjax': {k: int(v) for k, v in metadata.items()}} \
      if wrap_model else tensors
  _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def build_timm_model(model_config: ml_collections.ConfigDict, state_dict: dict[str, np.ndarray],
                     **overrides):
  """timm model for `model_config` (kwargs `overrides` on top, e.g. a classifier's
  num_classes / global_pool) with `state_dict` loaded strictly (eval mode)."""
  import timm
  import torch
  name, kwargs = timm_model_name_and_kwargs(model_config)
  model = timm.create_model(name, pretrained=False, **{**kwargs, **overrides})
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                        strict=True)
  return model.eval()


def _random_images(model_config: ml_collections.ConfigDict, batch: int, seed: int) -> np.ndarray:
  size = int(model_config.image_size)
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _nchw(images: np.ndarray):
  import torch
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def verify_timm(params: Any, model_config: ml_collections.ConfigDict,
                state_dict: dict[str, np.ndarray], *, batch: int = 2, seed: int = 0) -> float:
  """Max |timm forward_features − our tokens| on one random fp32 input (no segment ids)."""
  import jax
  import torch
  cfg = ml_collections.ConfigDict(model_config.to_dict())
  cfg.dtype = 'float32'  # the check is defined in fp32, whatever the training dtype
  cfg.attention = 'xla'
  images = _random_images(cfg, batch, seed)
  tokens, _ = vit_lib.ViT(cfg).apply({'params': jax.tree.map(np.asarray, params)}, images)
  model = build_timm_model(model_config, state_dict)
  with torch.no_grad():
    ref = model.forward_features(_nchw(images)).numpy()
  return float(np.max(np.abs(np.asarray(tokens, np.float32) - ref)))


def verify_classifier(predict: Callable, params: Any, state: Any,
                      model_config: ml_collections.ConfigDict, state_dict: dict[str, np.ndarray],
                      timm_kwargs: dict, *, batch: int = 2, seed: int = 0) -> float:
  """Max |timm logits − the trained objective's logits| / max(1, max |logits|) on random
  uint8 images (`predict`: the objective's own forward, normalisation included)."""
  import torch
  from mimjax.data.normalize import normalize_images
  size = int(model_config.image_size)
  images = np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), np.uint8)
  ours = np.asarray(predict(params, state, images), np.float32)
  model = build_timm_model(model_config, state_dict, **timm_kwargs)
  with torch.no_grad():
    ref = model(_nchw(np.asarray(normalize_images(images)))).numpy()
  return float(np.max(np.abs(ours - ref)) / max(1.0, float(np.max(np.abs(ref)))))
