"""SemanticMIM (proxy tokens) on MaskFeat or BEiT, ViT-B/16, IN-1K, 300 epochs (paper rows).

  python -m mimjax.main --config configs/semantic_mim.py:tiny --workdir /tmp/smim_tiny
  python -m mimjax.main --config configs/semantic_mim.py:tiny,base=beit --workdir /tmp/smim_beit
  python -m mimjax.main --config configs/semantic_mim.py:vit_b,in1k,300ep --workdir W \
      --config.data.data_dir=D --config.model.dtype=bfloat16
  python -m mimjax.tokenizer fit --config configs/semantic_mim.py:vit_b,in1k,300ep,base=beit \
      --out W/codebook.npy
  python -m mimjax.main --config configs/semantic_mim.py:vit_b,in1k,300ep,base=beit \
      --workdir W --config.tokenizer.codebook=W/codebook.npy
  python -m mimjax.bench --config configs/semantic_mim.py:vit_b --config.batch_size=8 --steps 1

Arg tokens: model (vit_b, ...), data (in1k, ...), <N>ep, tiny, and
  base=maskfeat|beit  the MIM framework (MaskFeat: HOG target; BEiT: token target);
  recipe=paper|repo   paper: mask 0.6, probe at block 7; repo (yyk-wew/SemanticMIM configs):
                      MaskFeat mask 0.8, probe on the last layer;
  masking=random|block  baselines only: random patches 40% (the paper's reproduced baselines,
                      default) or the original BEiT/MaskFeat block-wise masks.
Baselines without proxies: configs/maskfeat.py, configs/beit.py.
"""

import ml_collections

from configs import common
from mimjax import hog
from mimjax import tokenizer

# Paper Table 2 (pre-training), identical with and without proxies.
RECIPES = {
    'maskfeat': dict(base_lr=2e-4, warmup_epochs=30, min_lr=1e-6, clip_norm=0.02,
                     crop_scale=(0.5, 1.0), drop_path=0.0),
    'beit': dict(base_lr=1.5e-3 * 256 / 2048, warmup_epochs=10, min_lr=1e-5, clip_norm=3.0,
                 crop_scale=(0.08, 1.0), drop_path=0.1),
}


def mim_fields(config: ml_collections.ConfigDict, arg: ml_collections.ConfigDict, *,
               proxy: bool) -> None:
  """Model, masking, target, optimizer and data keys of SemanticMIM and its baselines."""
  if arg.base not in RECIPES:
    raise ValueError(f'config arg base={arg.base!r}: expected one of {sorted(RECIPES)}')
  if arg.recipe not in ('paper', 'repo'):
    raise ValueError(f'config arg recipe={arg.recipe!r}: expected "paper" or "repo"')
  recipe = RECIPES[arg.base]
  config.objective = 'semantic_mim'
  if arg.tiny:
    config.model = common.vit_config('mu/4', 32)
  else:
    config.model = common.vit_config(common.MODELS[arg.model], 224)
  config.model.pos_embed = 'learned'          # BEiT/MaskFeat/SemanticMIM: learned pos-embed
  config.model.proxy = proxy
  config.model.num_prefix_tokens = 8 if proxy else 1  # [PROXY] tokens / the baselines' [CLS]
  config.model.drop_path = recipe['drop_path']
  config.init_scheme = arg.base               # official backbone init (semantic_mim.official_init)

  # Masks: uniform random patches (official `SimMIMMaskGeneratorOurs`, ⌈N·r⌉ patches) for
  # SemanticMIM (paper 60%) and for the paper's reproduced baselines (40%, §4.3: "Our study
  # employs random patch masking"). `masking=block` = the original BEiT/MaskFeat papers'
  # block-wise masks (baselines only; beit.py/maskfeat.py set the block sizes).
  if arg.masking not in ('random', 'block'):
    raise ValueError(f'config arg masking={arg.masking!r}: expected "random" or "block"')
  if arg.masking == 'block' and proxy:
    raise ValueError('config arg masking=block: only for the baselines (configs/beit.py, '
                     'configs/maskfeat.py); SemanticMIM masks random patches')
  config.masking = arg.masking
  if proxy:
    config.mask_ratio = 0.8 if (arg.recipe == 'repo' and arg.base == 'maskfeat') else 0.6
  else:
    config.mask_ratio = 0.4
  config.block_mask = ml_collections.ConfigDict(
      {'min_patches': None, 'max_patches': None, 'min_aspect': 0.3})

  config.target = 'hog' if arg.base == 'maskfeat' else 'tokens'
  config.norm_pix = True                      # used by target='pixel'
  config.hog = hog.default_hog_config()   # mmpretrain: Gaussian window 16
  config.tokenizer = tokenizer.default_tokenizer_config()
  if arg.tiny:
    # 4-px patches: 2-px cells keep MaskFeat's 2×2 cells per patch (108-d); one window/patch.
    config.hog.cell_size = 2
    config.hog.gaussian_window = 4
    config.tokenizer.update({'vocab_size': 64, 'fit_images': 256, 'fit_iters': 10,
                             'fit_on_start': True})

  # Linear-probe read-out: configs/eval/linear.py uses them when its arg names no layer/pool
  # (objectives/linear_probe.resolve_probe); also `semantic_mim.encode_for_eval`'s default.
  # The paper probes block 7, the repo's config the last block (raw: final_norm=False).
  config.probe_layer = 7 if arg.recipe == 'paper' else -1
  config.probe_pool = 'cls'  # mean over the proxy tokens ('mean' = patch tokens)

  config.optim.base_lr = recipe['base_lr']
  config.optim.min_lr = recipe['min_lr']
  config.optim.b2 = 0.999
  config.optim.weight_decay = 0.05
  config.optim.clip_norm = recipe['clip_norm']
  config.optim.frozen = ()                    # learned pos-embed is trained
  # Official paramwise_cfg (biases, norms and ≤1-D tensors never decay): MaskFeat exempts only
  # mask_token (cls_token/pos_embed decay); BEiT exempts cls_token and pos_embed (mask_token
  # decays). reg_token = proxies 2..8, one cls_token tensor in the official code.
  config.optim.no_decay = (('mask_token$',) if arg.base == 'maskfeat'
                           else ('cls_token$', 'reg_token$', 'pos_embed$'))

  config.data.name = common.DATASETS[arg.data]
  config.data.image_size = config.model.image_size
  config.data.augment = 'mae'                 # RandomResizedCrop + flip
  config.data.crop_scale = recipe['crop_scale']
  common.set_schedule(config, arg, tiny_steps=200, tiny_warmup=10, tiny_log_every=20,
                      tiny_checkpoint_every=100, warmup_epochs=recipe['warmup_epochs'])
  if arg.tiny:
    config.optim.clip_norm = 3.0
    # HOG of 2-px cells on 32-px digits is L2-normalised per cell, so the faint interpolation
    # ramps around the strokes give unit vectors too (96 % of cells): the target is mostly
    # noise (a per-position mean predicts it to 0.0807, the global mean to 0.0851). In the
    # paper's 80 steps a learned pos-embed (init N(0, 0.02)) could not even learn the
    # per-position mean: the loss sat at the global mean's 0.0848 from step 40 on, although
    # the encoder learned (kNN of mean-pooled tokens 31 % at init → 43 %). Starting the
    # (still trained) pos-embed at 2-D sincos, as MAE's, and 200 steps make the fall visible.
    config.model.pos_embed = 'sincos'
  else:
    config.batch_size = 2048


def parse(arg: str) -> ml_collections.ConfigDict:
  """The arg string of this config family (see the module docstring)."""
  return common.parse_arg(arg, model='vit_b', data='in1k', epochs=300, tiny=False,
                          base='maskfeat', recipe='paper', masking='random')


def get_config(arg: str = 'vit_b,in1k,300ep') -> ml_collections.ConfigDict:
  config = common.base_config()
  mim_fields(config, parse(arg), proxy=True)
  return config
