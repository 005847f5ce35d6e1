"""Shared config pieces: arg parsing, model sizes, the trainer's keys."""

import os

import ml_collections
from ml_collections import config_dict

from mimjax.data import pipeline
from mimjax.models import segment_bias
from mimjax.models import vit

MODELS = {  # arg token → model.variant
    'mu': 'mu/4', 'vit_ti': 'Ti/16', 'vit_s': 'S/16', 'vit_b': 'B/16', 'vit_l': 'L/16',
    'vit_h': 'H/14', 'vit_s8': 'S/8', 'vit_b8': 'B/8',
}
DATASETS = {'in1k': 'imagenet2012', 'in100': 'imagenet100', 'digits': 'digits',
            'photos': 'photos', 'folder': 'image_folder', 'synthetic': 'synthetic'}


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """'vit_b,in1k,1600ep' → {model: 'vit_b', data: 'in1k', epochs: 1600, ...defaults}.

  Tokens: a MODELS key, a DATASETS key, '<N>ep', 'tiny', or 'key=value' for anything else.
  """
  out = dict(defaults)
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    if token in MODELS:
      out['model'] = token
    elif token in DATASETS:
      out['data'] = token
    elif token.endswith('ep') and token[:-2].isdigit():
      out['epochs'] = int(token[:-2])
    elif token == 'tiny':
      out['tiny'] = True
    elif '=' in token:
      key, value = token.split('=', 1)
      if key not in out:
        raise ValueError(f'config arg {arg!r}: unknown key {key!r}; known: {sorted(out)}')
      out[key] = type(out[key])(value) if out[key] is not None else value
    else:
      raise ValueError(f'config arg {arg!r}: cannot parse {token!r}; expected one of '
                       f'{sorted(MODELS)}, {sorted(DATASETS)}, <N>ep, tiny, key=value')
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """Keys every training config has (the trainer reads exactly these)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 4096            # global, across all hosts/devices
  c.grad_accum = 1               # micro-batches per step (same global batch)
  # Durations: exactly one of *_steps / *_epochs / *_examples per name. A command-line
  # override of one of them unsets the others (mimjax.durations.apply_cli_overrides).
  c.total_steps = config_dict.placeholder(int)
  c.total_epochs = config_dict.placeholder(float)
  c.total_examples = config_dict.placeholder(int)
  c.warmup_steps = config_dict.placeholder(int)
  c.warmup_epochs = config_dict.placeholder(float)
  c.warmup_examples = config_dict.placeholder(int)
  c.log_every = 100
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.async_checkpoint = True
  c.init_from = ''               # a workdir (or converted model) to take encoder params from
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'devices': -1})
  c.fsdp_min_size = 2 ** 16      # tensors smaller than this stay replicated under FSDP
  c.data = pipeline.default_data_config()
  c.optim = ml_collections.ConfigDict({
      'name': 'adamw', 'lr': config_dict.placeholder(float), 'base_lr': 1.5e-4, 'lr_scaling': 'linear', 'min_lr': 0.0,
      'b1': 0.9, 'b2': 0.95, 'eps': 1e-8, 'weight_decay': 0.05,
      'clip_norm': config_dict.placeholder(float),
      # Pretraining: the fixed sincos table is not trained (MAE requires_grad=False); configs
      # with a learned table and configs/eval/finetune.py set () (MAE fine-tuning trains it).
      'frozen': ('pos_embed$',),
      'no_decay': (),              # regexes; ≤1-D tensors and biases never decay
  })
  return c


def vit_config(variant: str, image_size: int) -> ml_collections.ConfigDict:
  """config.model for a ViT encoder."""
  return ml_collections.ConfigDict({
      'variant': variant, 'image_size': image_size, 'pos_embed': 'sincos', 'pool': 'cls',
      'dtype': 'float32', 'attention': 'xla', 'remat': False, 'drop_path': 0.0,
      # One nn.scan over the blocks (params stacked on a leading layer axis): same step, faster
      # compile (docs/performance.md).
      'scan_layers': False,
      # Optional overrides of the variant's sizes (None = the variant's value).
      'width': config_dict.placeholder(int), 'depth': config_dict.placeholder(int),
      'num_heads': config_dict.placeholder(int), 'mlp_dim': config_dict.placeholder(int),
      'patch_size': config_dict.placeholder(int),
      'segment_bias': segment_bias.default_config(),
  })


def loader_workers() -> int:
  """Grain worker processes for a paper row: half this host's cores, 1 to 16 (the other half
  feeds the accelerators and runs the train loop; 16 keeps host memory bounded)."""
  return max(1, min(16, (os.cpu_count() or 2) // 2))


def paper_speed(config: ml_collections.ConfigDict) -> None:
  """Paper rows run at accelerator speed: bfloat16 compute (params and optimizer state stay
  float32), the fused attention kernel (cuDNN on GPU; XLA's own on CPU/TPU), loader worker
  processes and, for the RandomResizedCrop recipes (MAE, DINO and the rows built on them), the
  crops (+ segment maps and patch ids) cut on the device: the host only decodes (docs/data.md;
  data.crop_on=host gives PIL's exact crops). Blocks stay unrolled: `model.scan_layers` compiles
  faster but XLA:TPU keeps 2.6× the temporaries for the scanned MAE-B/16 step (docs/training.md).
  `tiny` rows keep float32 einsum attention and host crops in-process, what a laptop CPU runs
  best."""
  config.model.dtype = 'bfloat16'
  config.model.attention = 'fused'
  config.data.worker_count = loader_workers()
  if config.data.augment in pipeline.DEVICE_CROPS:
    config.data.crop_on = 'device'


def ship_segment_ids(config: ml_collections.ConfigDict) -> None:
  """The loader turns SAM segment maps into patch ids on the host (the model's patch size and
  segment_bias.num_ids), so the device gets (…, N) ids instead of (…, H, W) maps."""
  config.data.segment_patch_size = vit.model_dims(config.model)['patch_size']
  config.data.segment_num_ids = config.model.segment_bias.get_ref('num_ids')


def set_schedule(config: ml_collections.ConfigDict, arg: ml_collections.ConfigDict, *,
                 tiny_steps: int, tiny_warmup: int, tiny_log_every: int,
                 tiny_checkpoint_every: int, warmup_epochs, paper_data: str = 'in1k',
                 log_every: int = 100, checkpoint_every: int = 2000) -> None:
  """Durations and cadence: a `tiny` row runs `tiny_steps` at batch 64, lr 1e-3 on the
  embedded digits (unless another data set was named); a paper row runs `arg.epochs` with
  `warmup_epochs` of warm-up."""
  if arg.tiny:
    config.data.name = 'digits' if arg.data == paper_data else DATASETS[arg.data]
    config.batch_size = 64
    config.total_steps = tiny_steps
    config.warmup_steps = tiny_warmup
    config.optim.lr = 1e-3
    config.log_every = tiny_log_every
    config.checkpoint_every = tiny_checkpoint_every
  else:
    paper_speed(config)
    config.total_epochs = arg.epochs
    config.warmup_epochs = warmup_epochs
    config.log_every = log_every
    config.checkpoint_every = checkpoint_every
