"""BEiT baseline (no proxies): full-sequence ViT with mask tokens, token target, blocks 75/196.

  python -m mimjax.main --config configs/beit.py:tiny --workdir /tmp/beit_tiny
  python -m mimjax.tokenizer fit --config configs/beit.py:vit_b,in1k,300ep --out W/codebook.npy
  python -m mimjax.main --config configs/beit.py:vit_b,in1k,300ep --workdir W \
      --config.data.data_dir=D --config.tokenizer.codebook=W/codebook.npy
  python -m mimjax.bench --config configs/beit.py:vit_b --config.batch_size=8 --steps 1 \
      --config.tokenizer.fit_on_start=True --config.tokenizer.fit_images=64

Recipe: SemanticMIM Table 2 / unilm BEiT (docs/semantic_mim.md) (75 of 196 patches in blocks of ≥ 16, cross-entropy
over a 8192-token vocabulary, lr 1.5e-3 at batch 2048, clip 3.0, drop path 0.1, RRC (0.08, 1)).
The shipped tokenizer is a k-means codebook on HOG features (`python -m mimjax.tokenizer fit`);
BEiT's DALL-E dVAE plugs in through `semantic_mim.make(config, tokenizer=...)`.
SemanticMIM on BEiT: configs/semantic_mim.py:...,base=beit.
"""

import ml_collections

from configs import common
from configs import semantic_mim


def get_config(arg: str = 'vit_b,in1k,300ep') -> ml_collections.ConfigDict:
  arg = semantic_mim.parse(arg)
  arg.base = 'beit'
  config = common.base_config()
  semantic_mim.mim_fields(config, arg, proxy=False)
  config.mask_ratio = 75 / 196         # BEiT: num_mask_patches 75 ("40%")
  config.block_mask.min_patches = 16   # --min_mask_patches_per_block
  if arg.tiny:
    config.mask_ratio = 0.4
    config.block_mask.min_patches = None
  return config
