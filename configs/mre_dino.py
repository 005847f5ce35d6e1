"""MRE-DINO: DINO with the mask-guided attention bias (SAM helps SSL, Eq. 6).

Every crop (2 global + N local) carries its own SAM segment map; the student gets the patch
ids of each crop it encodes, the teacher those of the 2 global crops. Needs the SAM output
(here its CPU-sized superpixel row on the 18 embedded photos, hence batch 16):
  python -m mimjax.sam --config configs/sam.py:tiny,superpixel --workdir /tmp/sp_tiny
  python -m mimjax.main --config configs/mre_dino.py:tiny --workdir /tmp/mre_dino_tiny \
      --config.data.name=photos --config.data.data_dir=/tmp/sp_tiny --config.batch_size=16
  python -m mimjax.main --config configs/mre_dino.py:vit_s,in100,300ep --workdir W \
      --config.data.data_dir=S_DATASET_DIR

Rows (paper Tab. 1, ImageNet-100): vit_s,in100,300ep / 600ep and vit_s8,in100,300ep, on the
recipe of configs/dino.py; `tiny` = configs/dino.py:tiny + the bias, with the BatchNorm-free head
of `dino.tiny_recipe(bn_head=False)` so that its workdir can be the teacher of
`configs/distill.py:tiny,method=dino` (the KD objective reads heads without BatchNorm).
"""

import ml_collections

from configs import dino
from configs import mre_mae


def get_config(arg: str = 'vit_s,in100,300ep') -> ml_collections.ConfigDict:
  config = dino.get_config(arg)
  mre_mae.mre_fields(config)
  if 'tiny' in (arg or '').split(','):
    dino.tiny_recipe(config, bn_head=False)
    # It trains on the SAM stage's photos (above), which have no labelled test split: no kNN
    # monitor (it would only print that it skips itself).
    config.evals = ml_collections.ConfigDict()
  return config
