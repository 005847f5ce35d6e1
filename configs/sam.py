"""SAM stage: automatic SAM masks → segment-id maps in a TFDS data set (SAM-helps-SSL, §3.1).

  python -m mimjax.sam --config configs/sam.py:tiny --workdir /tmp/sam_tiny
  python -m mimjax.sam --config configs/sam.py:tiny,superpixel --workdir /tmp/sp_tiny
  python -m mimjax.sam --config configs/sam.py:vit_h,in100 --workdir W \
      --config.source_data_dir=D --config.checkpoint=/ckpt/sam_vit_h_4b8939.pth \
      --config.shard_index=0 --config.num_shards=8      # one process per GPU, 0..7
  # then train: --config.data.name=imagenet100 --config.data.data_dir=W

Rows: vit_h (paper) | vit_l | vit_b, × grid8 | grid16 | grid32 (paper default: 32×32 points),
× a data token (in100, in1k, photos, digits, folder), or `tiny` (random tiny SAM, no weights)
and `superpixel` (scikit-image felzenszwalb, ranked by area). Any other key: key=value.
"""

import re

import ml_collections

from configs import common

DEFAULT_SOURCES = {'in100': 'imagenet100', 'in1k': 'imagenet2012', 'photos': 'photos',
                   'digits': 'digits', 'folder': '', 'synthetic': ''}


def get_config(arg: str = 'vit_h,in100') -> ml_collections.ConfigDict:
  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  grid = [int(m.group(1)) for t in tokens for m in [re.fullmatch(r'grid(\d+)', t)] if m]
  superpixel = 'superpixel' in tokens
  rest = ','.join(t for t in tokens if not re.fullmatch(r'grid\d+', t) and t != 'superpixel')
  arg = common.parse_arg(rest, model='vit_h', data='in100', tiny=False)
  if arg.model not in ('vit_h', 'vit_l', 'vit_b'):
    raise ValueError(f'configs/sam.py: model must be vit_h, vit_l or vit_b, got {arg.model!r}')

  c = ml_collections.ConfigDict()
  # Input / output.
  c.source = DEFAULT_SOURCES[arg.data]  # embedded name | TFDS dir | name under source_data_dir | image folder
  c.source_data_dir = ''         # where named TFDS sources live ('' = $MIMJAX_DATA_DIR / cache)
  c.name = ''                    # output W/NAME/1.0.0; '' = the source's name (what pipeline.py expects)
  c.resize_shorter = 0           # >0: downscale so the shorter side is at most this (maps follow)
  c.skip_corrupt = False         # data-builder rule: a corrupt image stops the run unless True
  # Mask source.
  c.mask_source = 'superpixel' if superpixel else 'sam'
  c.checkpoint = ''              # local .pth (sam_vit_h_4b8939.pth etc., see docs/sam.md)
  c.model_type = arg.model       # vit_h | vit_l | vit_b | tiny
  c.points_per_side = grid[0] if grid else 32   # paper: 32×32 = 1024 prompts
  c.points_per_batch = 64        # prompts per decoder batch: the GPU-memory knob
  c.max_masks = 5                # c in the paper
  c.rank_by = 'area' if superpixel else 'predicted_iou'  # | stability_score | area
  c.amg = ml_collections.ConfigDict({  # SamAutomaticMaskGenerator defaults (tuned for ViT-H)
      'pred_iou_thresh': 0.88, 'stability_score_thresh': 0.95, 'stability_score_offset': 1.0,
      'box_nms_thresh': 0.7, 'crop_n_layers': 0, 'crop_nms_thresh': 0.7,
      'crop_overlap_ratio': 512 / 1500, 'crop_n_points_downscale_factor': 1,
      'min_mask_region_area': 0})
  c.superpixel = ml_collections.ConfigDict({
      'method': 'felzenszwalb', 'scale': 100.0, 'sigma': 0.8, 'min_size': 50,  # felzenszwalb
      'n_segments': 16, 'compactness': 10.0})                                  # slic
  c.tiny_sam = ml_collections.ConfigDict({  # model_type='tiny': random init, seeded
      'img_size': 64, 'embed_dim': 32, 'depth': 1, 'num_heads': 2, 'prompt_dim': 32})
  c.seed = 0
  # Scale.
  c.shard_index = 0
  c.num_shards = 1
  c.chunk_size = 256             # examples per resumable part file
  c.device = 'auto'              # auto | cpu | cuda | cuda:N
  c.dtype = 'float32'            # as the official generator | bfloat16 (image encoder; + TF32 on CUDA)
  c.num_threads = 0              # torch CPU threads; 0 = torch default
  c.keep_parts = False           # keep W/.sam_work after the merge
  if arg.tiny:
    # CPU seconds: 18 scikit-image photos at ≤96 px, 8×8 prompts, tiny random SAM at 64 px.
    c.source = 'photos' if arg.data == 'in100' else c.source
    c.resize_shorter = 96
    c.chunk_size = 4
    c.superpixel.min_size = 20
    if not superpixel:
      c.model_type = 'tiny'
      c.points_per_side = grid[0] if grid else 8
      # Random weights: predicted IoU ≈ 0.03 and logits ≈ 0 (stability ≈ 0), and every mask's
      # box spans the image, so the ViT-H thresholds and box NMS would keep ≤ 1 mask.
      c.amg.pred_iou_thresh = 0.0
      c.amg.stability_score_thresh = 0.0
      c.amg.box_nms_thresh = 1.0
  return c
