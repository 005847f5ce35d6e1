"""MAE pretraining (He et al., 2022), official recipe.

  python -m mimjax.main --config configs/mae.py:tiny --workdir workdirs/mae_tiny
  python -m mimjax.main --config configs/mae.py:vit_b,in1k,1600ep --workdir W \
      --config.data.data_dir=D --config.model.dtype=bfloat16

Rows: vit_b/vit_l/vit_h × in1k/in100 × <N>ep (MAE paper: 1600 ep; ViT-L recipe 800 ep).
"""

import ml_collections

from configs import common


def mae_fields(config: ml_collections.ConfigDict, arg: ml_collections.ConfigDict) -> None:
  """Model, masking and data keys shared by MAE-family configs (MAE, MRE-MAE, LUT)."""
  config.objective = 'mae'
  config.mask_ratio = 0.75
  config.masking = 'random'
  config.target = 'pixel'
  config.norm_pix = True
  if arg.tiny:
    config.model = common.vit_config('mu/4', 32)
    config.model.decoder = ml_collections.ConfigDict(
        {'width': 32, 'depth': 1, 'num_heads': 4, 'mlp_dim': 128})
  else:
    config.model = common.vit_config(common.MODELS[arg.model], 224)
    config.model.decoder = ml_collections.ConfigDict(
        {'width': 512, 'depth': 8, 'num_heads': 16, 'mlp_dim': 2048})
  config.data.name = common.DATASETS[arg.data]
  config.data.image_size = config.model.image_size
  config.data.augment = 'mae'


def get_config(arg: str = 'vit_b,in1k,1600ep') -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, model='vit_b', data='in1k', epochs=1600, tiny=False)
  config = common.base_config()
  mae_fields(config, arg)
  # tiny: 2-layer width-64 ViT on 32-px digits; trains in 1–2 minutes on 2 cores
  # (65 s wall on a loaded 2-core machine, cold compilation cache).
  common.set_schedule(config, arg, tiny_steps=300, tiny_warmup=20, tiny_log_every=20,
                      tiny_checkpoint_every=100, warmup_epochs=40)
  return config
