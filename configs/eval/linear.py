"""Linear probe of a frozen pretrained encoder (MAE protocol; AbMILP / attentive poolings).

  python -m mimjax.main --config configs/eval/linear.py:tiny --workdir /tmp/lin_tiny \
      --config.pretrained=/tmp/mae_tiny
  python -m mimjax.main --config configs/eval/linear.py:vit_b,in1k,pool=abmilp --workdir E \
      --config.pretrained=W --config.data.data_dir=D

Arg tokens: a data set (in1k, in100, digits, ...), tiny, pool=cls|mean|abmilp|attentive,
layer=N (1-based block; -1 = last, SemanticMIM probes layer 7), num_classes=N,
optimizer=lars|sgd, heads=N (attentive probe heads). Writes E/results.json
(eval/top1, eval/top5 on the test split).
A DINO workdir is read at its EMA teacher, as DINO's own evaluations; add
`--config.checkpoint_key=student` for the student (docs/evaluation.md).
"""

from configs import common
from configs.eval import eval_common


def get_config(arg: str = 'vit_b,in1k'):
  arg = common.parse_arg(arg, model='vit_b', data='in1k', epochs=90, tiny=False, pool='cls',
                         layer=-1, num_classes=0, optimizer='lars', heads=12)
  config = eval_common.trained_eval_config(arg, 'linear_probe')
  config.probe = dict(pool=arg.pool, layer=arg.layer, num_heads=arg.heads,
                      num_classes=eval_common.num_classes(arg, config.data.name))
  config.optim.name = arg.optimizer
  config.optim.weight_decay = 0.0
  config.optim.momentum = 0.9
  config.optim.trust_coefficient = 0.001
  config.optim.frozen = ('^encoder/',)  # the whole pretrained encoder (checked at start-up)
  config.data.augment = 'mae'           # RandomResizedCrop + flip (MAE main_linprobe.py)
  config.data.crop_scale = (0.08, 1.0)
  if arg.tiny:
    config.data.name = 'digits' if arg.data == 'in1k' else config.data.name
    config.probe.num_classes = eval_common.num_classes(arg, config.data.name)
    config.data.image_size = 32
    config.data.crop_scale = (0.35, 1.0)  # 32-px digits: keep most of the glyph
    config.batch_size = 64
    config.total_steps = 200
    config.warmup_steps = 20
    config.optim.name = 'sgd' if arg.optimizer == 'lars' else arg.optimizer
    config.optim.lr = 0.1
    config.log_every = 20
    config.checkpoint_every = 100
  else:
    # MAE: batch 16384, blr 0.1 (lr 6.4), 90 epochs (50 for L/H), 10 warm-up epochs.
    config.data.image_size = 224
    config.batch_size = 16384
    config.optim.base_lr = 0.1
    config.total_epochs = arg.epochs
    config.warmup_epochs = 10
    config.log_every = 50
    config.checkpoint_every = 1000
  return config
