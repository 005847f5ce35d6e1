"""MRE-DINO: DINO with the mask-guided attention bias (SAM helps SSL, Eq. 6).

Every crop (2 global + N local) carries its own SAM segment map; the student gets the patch
ids of each crop it encodes, the teacher those of the 2 global crops. Needs the SAM output:
  python -m mimjax.sam --config configs/sam.py:ARG --workdir S
  python -m mimjax.main --config configs/mre_dino.py:tiny --workdir /tmp/mre_dino_tiny \
      --config.data.data_dir=S_DATASET_DIR
  python -m mimjax.main --config configs/mre_dino.py:vit_s,in100,300ep --workdir W \
      --config.data.data_dir=S_DATASET_DIR

Rows (paper Tab. 1, ImageNet-100): vit_s,in100,300ep / 600ep and vit_s8,in100,300ep, on the
recipe of configs/dino.py; `tiny` = configs/dino.py:tiny + the bias.
"""

import ml_collections

from configs import dino
from configs import mre_mae


def get_config(arg: str = 'vit_s,in100,300ep') -> ml_collections.ConfigDict:
  config = dino.get_config(arg)
  mre_mae.mre_fields(config)
  return config
