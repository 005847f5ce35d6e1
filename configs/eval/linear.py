"""Linear probe of a frozen pretrained encoder (MAE protocol; AbMILP / attentive poolings).

  python -m mimjax.main --config configs/eval/linear.py:tiny --workdir workdirs/lin_tiny \
      --config.pretrained=workdirs/mae_tiny
  python -m mimjax.main --config configs/eval/linear.py:vit_b,in1k,pool=abmilp --workdir E \
      --config.pretrained=W --config.data.data_dir=D

  # SemanticMIM's probe (paper §4.2 / repo *_linear_probing.py) on its pretrained workdir W:
  python -m mimjax.main --config configs/eval/linear.py:vit_b,in1k,recipe=semanticmim \
      --workdir E --config.pretrained=W --config.data.data_dir=D

Arg tokens: a data set (in1k, in100, digits, ...), tiny, pool=cls|mean|abmilp|attentive
(default: the pretraining config's `probe_pool`, else cls), layer=N (1-based block; -1 = last;
default: the pretraining config's `probe_layer`, e.g. 7 for SemanticMIM, else -1),
num_classes=N, optimizer=lars|sgd, heads=N (attentive probe heads), <N>ep, and
  recipe=mae          MAE main_linprobe.py: BN(affine=False) → Linear, LARS, batch 16384,
                      blr 0.1, 90 epochs, 10 warm-up;
  recipe=semanticmim  SemanticMIM: frozen LayerNorm read-out (no BatchNorm) → Linear
                      (trunc-normal 0.02), AdamW (0.9, 0.999) lr 4e-3 at batch 1024, wd 1e-4,
                      100 epochs, cosine to 0 without warm-up; raw block tokens (final_norm
                      False).
Writes E/results.json (eval/top1, eval/top5 on the test split).
A DINO workdir is read at its EMA teacher, as DINO's own evaluations; add
`--config.checkpoint_key=student` for the student (docs/evaluation.md).
"""

from configs import common
from configs.eval import eval_common

RECIPES = ('mae', 'semanticmim')


def get_config(arg: str = 'vit_b,in1k'):
  arg = common.parse_arg(arg, model='vit_b', data='in1k', epochs=0, tiny=False, pool='',
                         layer=0, num_classes=0, optimizer='lars', heads=12, recipe='mae')
  if arg.recipe not in RECIPES:
    raise ValueError(f'config arg recipe={arg.recipe!r}: expected one of {RECIPES}')
  config = eval_common.trained_eval_config(arg, 'linear_probe')
  # pool / layer None: the pretraining config's probe_pool / probe_layer (objectives/linear_probe).
  config.probe = dict(pool=arg.pool or None, layer=arg.layer or None, num_heads=arg.heads,
                      num_classes=eval_common.num_classes(arg, config.data.name),
                      norm='bn', init_std=0.01, final_norm=True)
  config.optim.name = arg.optimizer
  config.optim.weight_decay = 0.0
  config.optim.momentum = 0.9
  config.optim.trust_coefficient = 0.001
  config.optim.frozen = ('^encoder/',)  # the whole pretrained encoder (checked at start-up)
  config.data.augment = 'mae'           # RandomResizedCrop + flip (MAE main_linprobe.py)
  config.data.crop_scale = (0.08, 1.0)
  if arg.recipe == 'semanticmim':
    config.probe.update(norm='ln', init_std=0.02, final_norm=False)
    config.optim.name = 'adamw'
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 1e-4
    config.optim.base_lr = 1e-3         # × 1024/256 = the paper's 4e-3 at batch 1024
    config.optim.min_lr = 0.0
  if arg.tiny:
    config.data.name = 'digits' if arg.data == 'in1k' else config.data.name
    config.probe.num_classes = eval_common.num_classes(arg, config.data.name)
    config.data.image_size = 32
    config.data.crop_scale = (0.35, 1.0)  # 32-px digits: keep most of the glyph
    config.batch_size = 64
    config.total_steps = 200
    config.warmup_steps = 20
    if arg.recipe == 'semanticmim':
      config.warmup_steps = 0
      config.optim.lr = 4e-3
    else:
      config.optim.name = 'sgd' if arg.optimizer == 'lars' else arg.optimizer
      config.optim.lr = 0.1
    config.log_every = 20
    config.checkpoint_every = 100
  elif arg.recipe == 'semanticmim':
    config.data.image_size = 224
    config.batch_size = 1024
    config.total_epochs = arg.epochs or 100
    config.warmup_epochs = 0
    config.log_every = 100
    config.checkpoint_every = 2000
  else:
    # MAE: batch 16384, blr 0.1 (lr 6.4), 90 epochs (50 for L/H), 10 warm-up epochs.
    config.data.image_size = 224
    config.batch_size = 16384
    config.optim.base_lr = 0.1
    config.total_epochs = arg.epochs or 90
    config.warmup_epochs = 10
    config.log_every = 50
    config.checkpoint_every = 1000
  return config
