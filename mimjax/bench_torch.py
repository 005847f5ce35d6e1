"""PyTorch reference for `python -m mimjax.bench --torch eager|compile`: the official MAE step.

The model is facebookresearch/mae `models_mae.MaskedAutoencoderViT` rebuilt on current timm
blocks (`timm.models.vision_transformer.Block`, `timm.layers.PatchEmbed`): pre-norm blocks with
qkv bias, exact GELU, LN eps 1e-6, frozen 2-D sincos position embeddings, noise-argsort random
masking, the 8-block 512-d 16-head decoder and the norm-pix loss on removed patches. One train
step = forward + backward + AdamW(β = (0.9, 0.95), wd 0.05 on ≥2-D weights) step, under bf16
autocast on CUDA (fp32 on CPU). torch is imported only here (and in sam/, convert/).
"""

import functools
import time
from typing import Optional

import ml_collections
import numpy as np
import torch
from torch import nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from mimjax.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from mimjax.models.vit import model_dims, sincos_pos_embed_2d


class MaskedAutoencoderViT(nn.Module):
  """models_mae.MaskedAutoencoderViT (encoder, decoder, forward_loss) on timm blocks."""

  def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768,
               depth: int = 12, num_heads: int = 12, mlp_dim: int = 3072,
               decoder_embed_dim: int = 512, decoder_depth: int = 8,
               decoder_num_heads: int = 16, decoder_mlp_dim: int = 2048,
               norm_pix_loss: bool = True):
    super().__init__()
    norm = functools.partial(nn.LayerNorm, eps=1e-6)  # MAE: partial(nn.LayerNorm, eps=1e-6)
    self.patch_size = patch_size
    self.norm_pix_loss = norm_pix_loss
    self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
    n = self.patch_embed.num_patches
    grid = img_size // patch_size
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(  # frozen sincos (MAE: requires_grad=False, still a param)
        torch.from_numpy(sincos_pos_embed_2d(embed_dim, grid, True))[None], requires_grad=False)
    self.blocks = nn.ModuleList([
        Block(embed_dim, num_heads, mlp_dim / embed_dim, qkv_bias=True, norm_layer=norm)
        for _ in range(depth)])
    self.norm = norm(embed_dim)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed = nn.Parameter(
        torch.from_numpy(sincos_pos_embed_2d(decoder_embed_dim, grid, True))[None],
        requires_grad=False)
    self.decoder_blocks = nn.ModuleList([
        Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_dim / decoder_embed_dim,
              qkv_bias=True, norm_layer=norm) for _ in range(decoder_depth)])
    self.decoder_norm = norm(decoder_embed_dim)
    self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3)
    self.num_patches = n
    self._init_weights()

  def _init_weights(self) -> None:
    """models_mae.initialize_weights: xavier Linear/patch conv, normal(.02) tokens, LN 1/0."""
    w = self.patch_embed.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(self.cls_token, std=0.02)
    nn.init.normal_(self.mask_token, std=0.02)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
          nn.init.zeros_(m.bias)
      elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) → (B, L, p²·3) in (p, q, c) order."""
    p = self.patch_size
    h = w = imgs.shape[2] // p
    x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
    x = torch.einsum('nchpwq->nhwpqc', x)
    return x.reshape(imgs.shape[0], h * w, p * p * 3)

  def random_masking(self, x: torch.Tensor, mask_ratio: float,
                     noise: Optional[torch.Tensor] = None):
    """Per-sample noise argsort: keep the (1 − ratio)·L lowest-noise patches."""
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:  # (`noise` is an addition for tests: the official code always draws it)
      noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_masked, mask, ids_restore

  def forward_encoder(self, x: torch.Tensor, mask_ratio: float,
                      noise: Optional[torch.Tensor] = None):
    x = self.patch_embed(x)
    x = x + self.pos_embed[:, 1:, :]
    x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
    cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    x = torch.cat((cls, x), dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x), mask, ids_restore

  def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    x = self.decoder_embed(x)
    mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    x = self.decoder_pred(self.decoder_norm(x))
    return x[:, 1:, :]

  def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    target = self.patchify(imgs)
    if self.norm_pix_loss:
      mean = target.mean(dim=-1, keepdim=True)
      var = target.var(dim=-1, keepdim=True)
      target = (target - mean) / (var + 1.e-6) ** .5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()

  def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75,
              noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Returns the MAE loss (the official forward also returns pred and mask)."""
    latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
    pred = self.forward_decoder(latent, ids_restore)
    return self.forward_loss(imgs, pred, mask)


def from_config(config: ml_collections.ConfigDict) -> MaskedAutoencoderViT:
  """The PyTorch MAE with the sizes of a mimjax MAE config (config.model + .decoder)."""
  dims = model_dims(config.model)
  dec = config.model.decoder
  return MaskedAutoencoderViT(
      img_size=config.model.image_size, patch_size=dims['patch_size'], embed_dim=dims['width'],
      depth=dims['depth'], num_heads=dims['num_heads'], mlp_dim=dims['mlp_dim'],
      decoder_embed_dim=dec.width, decoder_depth=dec.depth, decoder_num_heads=dec.num_heads,
      decoder_mlp_dim=dec.mlp_dim, norm_pix_loss=config.norm_pix)


def param_count(model: nn.Module) -> int:
  """All parameters, frozen position embeddings included (as in the state_dict)."""
  return sum(p.numel() for p in model.parameters())


def param_groups(model: nn.Module, weight_decay: float) -> list:
  """timm 0.3.2 add_weight_decay as MAE uses it: no decay on 1-D tensors and biases."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    (no_decay if p.ndim <= 1 or name.endswith('.bias') else decay).append(p)
  return [{'params': no_decay, 'weight_decay': 0.0},
          {'params': decay, 'weight_decay': weight_decay}]


def bench_torch(config: ml_collections.ConfigDict, steps: int, warmup: int,
                mode: str = 'eager', device: Optional[str] = None,
                threads: Optional[int] = None) -> dict:
  """Times the official MAE train step in PyTorch on `config`'s sizes and batch.

  `threads` sets torch's CPU intra-op threads (default: torch's own choice). On a CPU shared
  with other jobs, OpenMP's busy-waiting threads can make eager mode 10-50× slower than one
  thread (docs/performance.md); GPUs are unaffected.
  """
  if mode not in ('eager', 'compile'):
    raise ValueError(f'--torch={mode!r}: expected "eager" or "compile"')
  if config.get('objective') != 'mae' or (config.model.get('segment_bias') is not None
                                          and config.model.segment_bias.enabled):
    raise ValueError(f'--torch compares against the official PyTorch MAE: config.objective '
                     f'must be "mae" without segment_bias (got {config.get("objective")!r})')
  device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = from_config(config).to(device)
  opt_cfg = config.optim
  lr = opt_cfg.lr if opt_cfg.get('lr') else opt_cfg.base_lr * config.batch_size / 256
  optimizer = torch.optim.AdamW(param_groups(model, opt_cfg.weight_decay), lr=lr,
                                betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps)
  forward = torch.compile(model) if mode == 'compile' else model
  # The JAX step also normalises uint8 images on device, so the torch step does the same.
  size = config.model.image_size
  images = torch.from_numpy(np.random.default_rng(0).integers(
      0, 256, (config.batch_size, 3, size, size), dtype=np.uint8)).to(device)
  mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
  std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
  use_bf16 = device.type == 'cuda'
  ratio = config.mask_ratio

  def step() -> torch.Tensor:
    x = (images.float() - mean) / std
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
      loss = forward(x, ratio)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  t = time.perf_counter()
  loss = step()  # first step: compilation (compile mode), allocator warm-up
  sync()
  first_s = time.perf_counter() - t
  for _ in range(warmup):
    loss = step()
  sync()
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  t = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  step_s = (time.perf_counter() - t) / steps
  return {
      'framework': f'torch {torch.__version__} {mode}', 'device': str(device),
      'device_kind': (torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'),
      'threads': torch.get_num_threads(), 'autocast': 'bfloat16' if use_bf16 else 'float32',
      'batch_size': config.batch_size, 'params': param_count(model),
      'first_step_s': round(first_s, 2), 'step_ms': round(step_s * 1e3, 3),
      'img_per_s': round(config.batch_size / step_s, 1),
      'peak_mem_gb': (round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
                      if device.type == 'cuda' else None),
      'final_loss': float(loss.detach()),
  }


# ------------------------------------------------------------------- the official host pipelines
class _PILGaussianBlur:
  """DINO utils.GaussianBlur: PIL GaussianBlur(radius ~ U(0.1, 2)) with probability p."""

  def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
    self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

  def __call__(self, img):
    import random
    from PIL import ImageFilter
    if random.random() <= self.p:
      return img.filter(ImageFilter.GaussianBlur(
          radius=random.uniform(self.radius_min, self.radius_max)))
    return img


class _PILSolarization:
  """DINO utils.Solarization: PIL ImageOps.solarize (threshold 128) with probability p."""

  def __init__(self, p: float):
    self.p = p

  def __call__(self, img):
    import random
    from PIL import ImageOps
    return ImageOps.solarize(img) if random.random() < self.p else img


def official_transform(data_config: ml_collections.ConfigDict):
  """The official recipe's host transform for `data_config.augment`, ending in uint8 CHW
  tensors as mimjax ships uint8 (normalisation is on the device in both): MAE main_pretrain.py
  `transform_train` ('mae'), DINO main_dino.py `DataAugmentationDINO` ('dino'); None for the
  others."""
  from PIL import Image
  from torchvision import transforms as T
  bicubic = Image.BICUBIC
  size = data_config.image_size
  if data_config.augment == 'mae':
    return T.Compose([T.RandomResizedCrop(size, scale=tuple(data_config.crop_scale),
                                          interpolation=bicubic),
                      T.RandomHorizontalFlip(), T.PILToTensor()])
  if data_config.augment != 'dino':
    return None
  flip_and_color_jitter = T.Compose([
      T.RandomHorizontalFlip(p=0.5),
      T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                    p=0.8),
      T.RandomGrayscale(p=0.2)])
  crop = lambda s, scale: T.RandomResizedCrop(s, scale=tuple(scale), interpolation=bicubic)
  g1 = T.Compose([crop(size, data_config.global_crops_scale), flip_and_color_jitter,
                  _PILGaussianBlur(1.0), T.PILToTensor()])
  g2 = T.Compose([crop(size, data_config.global_crops_scale), flip_and_color_jitter,
                  _PILGaussianBlur(0.1), _PILSolarization(0.2), T.PILToTensor()])
  local = T.Compose([crop(data_config.local_size, data_config.local_crops_scale),
                     flip_and_color_jitter, _PILGaussianBlur(0.5), T.PILToTensor()])
  n = data_config.local_crops_number
  return lambda img: [g1(img), g2(img)] + [local(img) for _ in range(n)]


def official_cpu_seconds(transform, encoded: list, seed: int = 0) -> float:
  """CPU time (process time, one torch thread) of ImageFolder's loader (PIL open → RGB) plus
  `transform` on each encoded image, collated into batches of the list's length."""
  import io
  import random
  from PIL import Image
  from torch.utils.data import default_collate
  torch.set_num_threads(1)
  random.seed(seed)
  torch.manual_seed(seed)
  t = time.process_time()
  views = []
  for raw in encoded:
    with Image.open(io.BytesIO(raw)) as img:
      views.append((transform(img.convert('RGB')), 0))
  default_collate(views)
  return time.process_time() - t
