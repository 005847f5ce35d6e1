"""MRE-MAE: MAE with the mask-guided attention bias (SAM helps SSL, Taguchi et al.).

Needs data with SAM segment maps (`segments`), written by the SAM stage (here its CPU-sized
superpixel row on the 18 embedded photos, hence batch 16; configs/sam.py:tiny runs SAM itself):
  python -m mimjax.sam --config configs/sam.py:tiny,superpixel --workdir /tmp/sp_tiny
  python -m mimjax.main --config configs/mre_mae.py:tiny --workdir /tmp/mre_mae_tiny \
      --config.data.name=photos --config.data.data_dir=/tmp/sp_tiny --config.batch_size=16
  python -m mimjax.main --config configs/mre_mae.py:vit_b,in100,1600ep --workdir W \
      --config.data.data_dir=S_DATASET_DIR --config.model.dtype=bfloat16

(`S_DATASET_DIR` = the directory holding the SAM output's dataset_info.json, or its parent
data dir.) Rows (paper Tab. 1, ImageNet-100): vit_b,in100,1600ep / 3200ep and vit_b8,in100,
1600ep; `tiny` = configs/mae.py:tiny + the bias (mu/4, 32 px). Bias knobs:
config.model.segment_bias.{mode, sign, init_pos, init_neg, fixed_value, num_ids}
(docs/mre.md).
"""

import ml_collections

from configs import common
from configs import mae


def mre_fields(config: ml_collections.ConfigDict) -> None:
  """Switches on the MRE bias with the paper's best setting (per layer and head, both signs)."""
  seg = config.model.segment_bias
  seg.enabled = True
  seg.mode = 'layer_head'   # Tab. 5: per layer × head is best (77.1 vs 74.6 per head)
  seg.sign = 'both'         # Tab. 4: positive and negative relations
  seg.init_pos = 0.0        # paper silent: 0 = start as plain attention
  seg.init_neg = 0.0
  seg.num_ids = 8           # c = 5 masks (+ background 0) fit
  config.data.use_segments = True
  common.ship_segment_ids(config)  # patch ids computed by the loader, not on the device
  # u_pos/u_neg are (depth, heads) 2-D tensors: timm's rule would decay them toward 0; the paper
  # is silent, we keep them out of weight decay (docs/mre.md).
  config.optim.no_decay = tuple(config.optim.no_decay) + ('segment_bias/',)


def get_config(arg: str = 'vit_b,in100,1600ep') -> ml_collections.ConfigDict:
  config = mae.get_config(arg if arg else 'vit_b,in100,1600ep')
  parsed = common.parse_arg(arg, model='vit_b', data='in100', epochs=1600, tiny=False)
  if not parsed.tiny and parsed.data == 'in100':
    config.data.name = 'imagenet100'
  mre_fields(config)
  return config
