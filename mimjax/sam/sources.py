"""Mask sources: SAM's automatic mask generator (PyTorch) and a superpixel fallback.

A source maps an (H, W, 3) uint8 RGB image to a list of AMG-style records
({'segmentation': (H, W) bool, 'area', 'predicted_iou', 'stability_score'}); the generator
module turns them into an id map. torch / segment_anything are imported lazily here so the
superpixel source and the rest of mimjax never load them.
"""

import os
from typing import Callable

import ml_collections
import numpy as np

MODEL_TYPES = ('vit_h', 'vit_l', 'vit_b', 'tiny')
MASK_SOURCES = ('sam', 'superpixel')
SUPERPIXEL_METHODS = ('felzenszwalb', 'slic')
# Official checkpoints (facebookresearch/segment-anything README, "Model Checkpoints").
CHECKPOINTS = {
    'vit_h': ('sam_vit_h_4b8939.pth',
              'https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth'),
    'vit_l': ('sam_vit_l_0b3195.pth',
              'https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth'),
    'vit_b': ('sam_vit_b_01ec64.pth',
              'https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth'),
}

MaskSource = Callable[[np.ndarray], list]


class CheckpointError(Exception):
  """The SAM checkpoint is missing or does not fit `model_type` (message says what to get)."""


def _expected(model_type: str) -> str:
  name, url = CHECKPOINTS[model_type]
  return (f'expected the official {model_type} checkpoint {name}; download it with\n'
          f'  wget {url}\nand pass --config.checkpoint=/path/to/{name} '
          f'(or use --config.model_type=tiny / --config.mask_source=superpixel without weights)')


def check_checkpoint(model_type: str, checkpoint: str) -> None:
  """Raises CheckpointError unless `checkpoint` is an existing file (not needed for 'tiny')."""
  if model_type not in MODEL_TYPES:
    raise ValueError(f'config.model_type must be one of {MODEL_TYPES}, got {model_type!r}')
  if model_type == 'tiny':
    return
  if not checkpoint:
    raise CheckpointError(f'config.checkpoint is empty; {_expected(model_type)}')
  path = os.path.expanduser(checkpoint)
  if not os.path.isfile(path):
    raise CheckpointError(f'SAM checkpoint {path} not found; {_expected(model_type)}')


def resolve_device(device: str) -> str:
  """'auto' → 'cuda' when available else 'cpu'; anything else is checked and returned."""
  import torch
  if device == 'auto':
    return 'cuda' if torch.cuda.is_available() else 'cpu'
  if device.startswith('cuda') and not torch.cuda.is_available():
    raise ValueError(f'config.device={device!r} but torch sees no CUDA device; use cpu/auto')
  return device


def build_tiny_sam(cfg: ml_collections.ConfigDict, seed: int):
  """A small randomly initialised `Sam` (same modules as the real ones, seeded init)."""
  import functools
  import torch
  from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                         TwoWayTransformer)
  torch.manual_seed(seed)
  size, patch, dim = cfg.img_size, 16, cfg.prompt_dim
  sam = Sam(
      image_encoder=ImageEncoderViT(
          img_size=size, patch_size=patch, embed_dim=cfg.embed_dim, depth=cfg.depth,
          num_heads=cfg.num_heads, mlp_ratio=4, out_chans=dim, qkv_bias=True,
          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=False,
          window_size=0, global_attn_indexes=()),
      prompt_encoder=PromptEncoder(
          embed_dim=dim, image_embedding_size=(size // patch, size // patch),
          input_image_size=(size, size), mask_in_chans=16),
      mask_decoder=MaskDecoder(
          num_multimask_outputs=3,
          transformer=TwoWayTransformer(depth=cfg.depth, embedding_dim=dim, mlp_dim=4 * dim,
                                        num_heads=cfg.num_heads),
          transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim),
      pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
  return sam.eval()


def load_sam(model_type: str, checkpoint: str):
  """The official architecture of `model_type` with the weights of `checkpoint` (on CPU)."""
  import torch
  from segment_anything import sam_model_registry
  check_checkpoint(model_type, checkpoint)
  path = os.path.expanduser(checkpoint)
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (any unpickling failure)
    raise CheckpointError(f'{path} is not a readable PyTorch state dict '
                          f'({type(e).__name__}); {_expected(model_type)}') from None
  sam = sam_model_registry[model_type](checkpoint=None)
  want = {k: tuple(v.shape) for k, v in sam.state_dict().items()}
  got = {k: tuple(getattr(v, 'shape', ())) for k, v in state.items()} if isinstance(
      state, dict) else {}
  missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  reshaped = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or unexpected or reshaped:
    # Counts and one example each, not the key wall load_state_dict would print.
    parts = [f'{len(v)} {what} (e.g. {v[0]})' for what, v in
             (('missing keys', missing), ('unexpected keys', unexpected),
              ('shape mismatches', reshaped)) if v]
    raise CheckpointError(f'{path} does not fit model_type={model_type!r}: '
                          f'{", ".join(parts)}; {_expected(model_type)}')
  sam.load_state_dict(state)
  return sam.eval()


def autocast_encoder(encoder, device: str):
  """Wraps the image encoder so it runs under bf16 autocast on `device` and returns float32."""
  import torch
  device_type = 'cuda' if device.startswith('cuda') else 'cpu'

  class AutocastEncoder(torch.nn.Module):
    """Image encoder in bf16 (the heavy ViT); prompt/mask decoders and thresholds stay fp32."""

    def __init__(self, inner):
      super().__init__()
      self.inner = inner
      self.img_size = inner.img_size

    def forward(self, x):
      with torch.autocast(device_type, dtype=torch.bfloat16):
        return self.inner(x).float()

  return AutocastEncoder(encoder)


def make_sam_source(config: ml_collections.ConfigDict) -> MaskSource:
  """SamAutomaticMaskGenerator over the configured model, grid and thresholds."""
  import torch
  from segment_anything import SamAutomaticMaskGenerator
  if config.num_threads > 0:
    torch.set_num_threads(config.num_threads)
  if config.model_type == 'tiny':
    sam = build_tiny_sam(config.tiny_sam, config.seed)
  else:
    sam = load_sam(config.model_type, config.checkpoint)
  device = resolve_device(config.device)
  sam = sam.to(device)
  # float32 keeps torch's defaults, as the official generator runs; bfloat16 is the faster,
  # approximate option (docs/sam.md measures its mask agreement).
  if config.dtype == 'bfloat16':
    if device.startswith('cuda'):
      torch.backends.cuda.matmul.allow_tf32 = True
      torch.backends.cudnn.allow_tf32 = True
    sam.image_encoder = autocast_encoder(sam.image_encoder, device)
  amg = SamAutomaticMaskGenerator(
      sam, points_per_side=config.points_per_side, points_per_batch=config.points_per_batch,
      output_mode='binary_mask', **config.amg.to_dict())

  def generate(image: np.ndarray) -> list:
    with torch.inference_mode():
      return amg.generate(np.ascontiguousarray(image, np.uint8))

  return generate


def superpixel_labels(image: np.ndarray, cfg: ml_collections.ConfigDict) -> np.ndarray:
  """(H, W) int superpixel labels of scikit-image felzenszwalb or SLIC."""
  from skimage import segmentation
  if cfg.method == 'felzenszwalb':
    return segmentation.felzenszwalb(image, scale=cfg.scale, sigma=cfg.sigma,
                                     min_size=cfg.min_size)
  return segmentation.slic(image, n_segments=cfg.n_segments, compactness=cfg.compactness,
                           sigma=cfg.sigma, start_label=1)


def make_superpixel_source(config: ml_collections.ConfigDict) -> MaskSource:
  """Superpixels as AMG-style records (no scores but `area`: they are ranked by area)."""

  def generate(image: np.ndarray) -> list:
    labels = superpixel_labels(image, config.superpixel)
    ids, counts = np.unique(labels, return_counts=True)
    return [{'segmentation': labels == i, 'area': int(n)} for i, n in zip(ids, counts)]

  return generate


def make_mask_source(config: ml_collections.ConfigDict) -> MaskSource:
  """The configured source (`config.mask_source`)."""
  if config.mask_source == 'sam':
    return make_sam_source(config)
  return make_superpixel_source(config)
