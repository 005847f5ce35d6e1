"""LUT pretraining (Kim et al., 2024, "Learning with Unmasked Tokens"), official-code recipe.

  python -m mimjax.main --config configs/lut.py:tiny --workdir /tmp/lut_tiny
  python -m mimjax.main --config configs/lut.py:vit_b,in1k,1600ep --workdir W \
      --config.data.data_dir=D --config.model.dtype=bfloat16
  python -m mimjax.main --config configs/lut.py:vit_s,in1k,1600ep --workdir W --config.data.data_dir=D
  python -m mimjax.main --config configs/lut.py:vit_b,in1k,400ep --workdir W --config.data.data_dir=D
  python -m mimjax.main --config configs/lut.py:vit_b,in1k,1600ep,variant=paper --workdir W \
      --config.data.data_dir=D

Rows: vit_s (α = 1.0) / vit_b (α = 0.25) × in1k/in100 × <N>ep (paper: 1600 ep; ablations:
400 ep). `variant=paper` follows the paper's text instead of the code (docs/lut.md):
one online view (the reconstruction view) vs the target of the other view, target BatchNorm
on batch statistics, Adam β2 0.999, linear lr scaling.
"""

import ml_collections

from configs import common
from configs import mae as mae_config
from mimjax.objectives import lut

VARIANTS = ('code', 'paper')


def get_config(arg: str = 'vit_b,in1k,1600ep') -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, model='vit_b', data='in1k', epochs=1600, tiny=False,
                         variant='code')
  if arg.variant not in VARIANTS:
    raise ValueError(f'config arg variant={arg.variant!r}: expected one of {VARIANTS}')
  config = common.base_config()
  mae_config.mae_fields(config, arg)  # ViT + MAE decoder, mask 0.75, norm_pix
  config.objective = 'lut'
  config.data.augment = 'lut'         # (B, 2, H, W, 3): SRC view, SRC + jitter + 3-augment view
  config.lut = lut.default_config()
  # Paper: α = 1.0 for ViT-S/16, 0.25 for ViT-B/16 (and the code's ViT-B/L recipe).
  config.lut.alpha = 1.0 if arg.tiny or arg.model == 'vit_s' else 0.25
  # Code recipe: AdamW (0.9, 0.95), wd 0.05, blr 1.5e-4 with lr = blr·√batch/4, 40 warm-up ep.
  config.optim.base_lr = 1.5e-4
  config.optim.lr_scaling = 'sqrt'
  config.optim.b2 = 0.95
  config.optim.weight_decay = 0.05
  if arg.variant == 'paper':
    config.lut.symmetric = False
    config.lut.target_bn_stats = 'batch'
    config.optim.b2 = 0.999
    config.optim.lr_scaling = 'linear'
  # tiny: 2-layer width-64 ViT on 32-px digits, 256-d heads; about a minute on 2 cores
  # (70 s wall, docs/lut.md).
  common.set_schedule(config, arg, tiny_steps=100, tiny_warmup=10, tiny_log_every=10,
                      tiny_checkpoint_every=100, warmup_epochs=40)
  if arg.tiny:
    config.lut.projector.mlp_dim = 256
    config.lut.predictor.mlp_dim = 256
    config.lut.momentum = 0.99      # 0.996 would leave the target at its init in 100 steps
  return config
