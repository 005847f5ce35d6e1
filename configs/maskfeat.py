"""MaskFeat baseline (no proxies): full-sequence ViT with mask tokens, HOG target, BEiT blocks 40%.

  python -m mimjax.main --config configs/maskfeat.py:tiny --workdir /tmp/maskfeat_tiny
  python -m mimjax.main --config configs/maskfeat.py:vit_b,in1k,300ep --workdir W \
      --config.data.data_dir=D --config.model.dtype=bfloat16
  python -m mimjax.bench --config configs/maskfeat.py:vit_b --config.batch_size=8 --steps 1

Recipe: SemanticMIM Table 2 / mmpretrain's MaskFeat config (docs/semantic_mim.md) (78 of 196 patches in blocks of ≥ 15, HOG with
mmpretrain's Gaussian window, lr 2e-4 per 256, clip 0.02, 30 warm-up epochs, RRC (0.5, 1)).
SemanticMIM on MaskFeat: configs/semantic_mim.py.
"""

import ml_collections

from configs import common
from configs import semantic_mim


def get_config(arg: str = 'vit_b,in1k,300ep') -> ml_collections.ConfigDict:
  arg = semantic_mim.parse(arg)
  arg.base = 'maskfeat'
  config = common.base_config()
  semantic_mim.mim_fields(config, arg, proxy=False)
  config.block_mask.min_patches = 15   # = 78 // 5 at 224 px (SlowFast, mmpretrain)
  if arg.tiny:
    config.block_mask.min_patches = None  # num_masked // 5 on the 8×8 grid
  return config
