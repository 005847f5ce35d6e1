"""DINO pretraining (Caron et al., 2021), the official recipe (facebookresearch/dino).

  python -m mimjax.main --config configs/dino.py:tiny --workdir /tmp/dino_tiny
  python -m mimjax.main --config configs/dino.py:vit_s,in100,300ep --workdir W \
      --config.data.data_dir=D --config.model.dtype=bfloat16

Rows: vit_s / vit_s8 × in100 × 300ep / 600ep (SAM-helps-SSL's DINO baselines: ViT-S/16 300 and
600 ep, ViT-S/8 300 ep) and vit_s,in1k,300ep (the DINO README's "boosted" ViT-S/16 recipe:
teacher temp 0.04 → 0.07 over 30 epochs, norm_last_layer false). `tiny` = mu/4 on 32-px digits
with 2 global 32-px and 2 local 16-px crops, 60 steps, with an anti-collapse recipe (DINO's
BatchNorm head `dino.head.use_bn` = `--use_bn_in_head`, K 64, lr 5e-4, xavier init, teacher temp
0.01, momentum 0.99, local crops 0.25–0.5; docs/dino.md); about a minute and a half on a 2-core
CPU. It also holds on the 400-step schedule (loss 3.35 = 0.80 ln K at step 400, kNN 67.3 % vs
62.0 % for the encoder at init):

  python -m mimjax.main --config configs/dino.py:tiny --workdir /tmp/dino_tiny_400 \
      --config.total_steps=400

A kNN
monitor (`config.evals.knn`, mimjax/evaluate/knn.py) runs at the end (and every 10k steps);
its top-1 is in W/results.json.
"""

import ml_collections

from configs import common
from mimjax.objectives import dino


def dino_fields(config: ml_collections.ConfigDict, arg: ml_collections.ConfigDict) -> None:
  """Model, head, data and optimizer keys shared by DINO-family configs (DINO, MRE-DINO)."""
  config.objective = 'dino'
  config.dino = dino.default_config()
  if arg.tiny:
    config.model = common.vit_config('mu/4', 32)
    config.dino.head.update(hidden_dim=128, bottleneck_dim=32)   # out_dim: get_config
    config.data.local_size = 16
    config.data.local_crops_number = 2
  else:
    config.model = common.vit_config(common.MODELS[arg.model], 224)
    config.data.local_size = 96
    config.data.local_crops_number = 8          # main_dino.py default
    config.dino.head.norm_last_layer = False    # README: better for ViT-S (less stable)
  config.model.pos_embed = 'learned'            # DINO: learned, trunc-normal(.02)
  config.model.drop_path = 0.1                  # student only; the teacher runs train=False
  config.data.name = common.DATASETS[arg.data]
  config.data.image_size = config.model.image_size
  config.data.augment = 'dino'
  config.data.global_crops_scale = (0.4, 1.0)
  config.data.local_crops_scale = (0.05, 0.4)

  o = config.optim
  o.base_lr = 5e-4                # × batch / 256
  o.min_lr = 1e-6
  o.warmup = 'linspace'           # cosine_scheduler: np.linspace(0, lr, W) peaks at step W − 1
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8   # torch AdamW defaults
  o.weight_decay = 0.04
  o.weight_decay_end = 0.4        # per-step cosine
  o.clip_per_tensor = 3.0         # DINO clip_gradients: per parameter tensor
  o.freeze = ('last_layer',)      # cancel_gradients_last_layer ...
  o.freeze_epochs = 1             # ... during epoch 0
  o.freeze_steps = None
  o.frozen = ()                   # the learned pos-embed trains
  o.no_decay = ()                 # cls_token/pos_embed decay, as in DINO's param groups

  # kNN monitor (DINO eval_knn.py: k 20, T 0.07, cls after the final norm) on the EMA teacher
  # encoder (checkpoint_key 'student': the student) at the end of training and every
  # `every_steps`.
  config.evals = ml_collections.ConfigDict({'knn': ml_collections.ConfigDict({
      'module': 'knn', 'every_steps': None, 'k': 20, 'temperature': 0.07, 'pool': 'cls',
      'checkpoint_key': 'teacher'})})


def tiny_recipe(config: ml_collections.ConfigDict, bn_head: bool) -> None:
  """The anti-collapse recipe of the 2-block `tiny` model (docs/dino.md, "Collapse of tiny").

  With DINO's N(0, .02) init the cls token hardly depends on the image, the center absorbs the
  common part and τ_t 0.04 → 0.07 leaves a flat target (uniform collapse, loss = ln K). A small
  head (K 64), the MAE xavier init (more input dependence at step 0), a sharp teacher (τ_t 0.01),
  a faster teacher (momentum 0.99, DINO's advice for short runs) and no drop path (it drops half
  of a 2-block student) keep it off both collapse modes for 60 steps. Without a BatchNorm head
  the loss drifts back above ln K in the cosine tail of longer schedules (400 steps: 4.40, the
  official loop's too); `bn_head` adds DINO's `--use_bn_in_head` with lr 5e-4 and local crops
  0.25–0.5, which hold it (400 steps: 3.35). `bn_head=False` keeps DINO's lr rule
  (5e-4 × 64/256) and crop scales: a head the KD objective (distill.method=dino) can read.
  """
  config.model.drop_path = 0.0
  config.dino.head.out_dim = 64
  config.dino.head.use_bn = bn_head
  config.dino.init = 'model'
  config.dino.momentum_teacher = 0.99
  config.dino.warmup_teacher_temp = 0.01
  config.dino.teacher_temp = 0.01
  config.dino.warmup_teacher_temp_epochs = 0
  config.optim.lr = 5e-4 if bn_head else None          # None: base_lr × batch / 256
  config.data.local_crops_scale = (0.25, 0.5) if bn_head else (0.05, 0.4)


def get_config(arg: str = 'vit_s,in100,300ep') -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, model='vit_s', data='in100', epochs=300, tiny=False)
  config = common.base_config()
  dino_fields(config, arg)
  if arg.tiny:
    config.data.name = 'digits' if arg.data == 'in100' else common.DATASETS[arg.data]
    config.batch_size = 64
    config.total_steps = 60
    config.warmup_steps = 5
    config.optim.freeze_epochs = 1          # digits: 1500 // 64 = 23 steps per epoch
    tiny_recipe(config, bn_head=True)
    config.log_every = 10
    config.checkpoint_every = 60
  else:
    common.paper_speed(config)
    config.evals.knn.every_steps = 10000
    config.batch_size = 1024      # official: 64 per GPU × 16 GPUs
    config.total_epochs = arg.epochs
    config.warmup_epochs = 10
    config.log_every = 100
    config.checkpoint_every = 2000
  return config
