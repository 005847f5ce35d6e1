"""KD post-processing of an MRE teacher (SAM helps SSL §3.3): the result is a plain ViT.

  # teacher T = a finished configs/mre_mae.py (or mre_dino.py) workdir, e.g. its tiny row
  python -m mimjax.main --config configs/distill.py:tiny --workdir /tmp/kd_tiny \
      --config.teacher=/tmp/mre_mae_tiny --config.data.name=photos \
      --config.data.data_dir=/tmp/sp_tiny --config.batch_size=16
  python -m mimjax.main --config configs/distill.py:vit_b,in100,100ep --workdir W \
      --config.teacher=T --config.data.data_dir=S_DATASET_DIR
  python -m mimjax.main --config configs/distill.py:vit_s,in100,100ep,method=dino \
      --workdir W --config.teacher=T --config.data.data_dir=S_DATASET_DIR

`config.model` is the student: the teacher's architecture with the bias off (checked against
T/config.json). The data must still carry `segments` (the teacher uses them). Knobs:
config.distill.{method, weight (λ = 1), layers ('last' as MAE-Lite; or 'all'), init ('teacher'),
crops, temps}; the KD length (100 epochs here) is not given in the paper (docs/mre.md).
"""

import ml_collections

from configs import common
from configs import dino
from configs import mae
from mimjax.objectives import distill


def get_config(arg: str = 'vit_b,in100,100ep') -> ml_collections.ConfigDict:
  parsed = common.parse_arg(arg, model='vit_b', data='in100', epochs=100, tiny=False,
                            method='mae')
  base = {'mae': mae, 'dino': dino}.get(parsed.method)
  if base is None:
    raise ValueError(f'configs/distill.py arg method={parsed.method!r}: expected mae or dino')
  tokens = [t for t in (arg or '').split(',') if t and not t.startswith('method=')]
  if not parsed.tiny and not any(t in common.DATASETS for t in tokens):
    tokens.append('in100')
  config = base.get_config(','.join(tokens))
  config.objective = 'distill'
  config.teacher = ''                       # required: the MRE teacher's workdir
  config.distill = distill.default_config()
  config.distill.method = parsed.method
  config.data.use_segments = True           # the teacher needs its masks ...
  common.ship_segment_ids(config)           # ... as patch ids (same patch size as the student)
  if parsed.method == 'dino':
    # No EMA, no centering: a frozen teacher; the last-layer freeze/temperature warm-up of
    # DINO do not apply to a student that starts from the teacher's weights.
    config.optim.freeze = ()
    config.optim.freeze_epochs = None
    if parsed.tiny:  # the teacher's (configs/mre_dino.py:tiny) head: no BatchNorm
      dino.tiny_recipe(config, bn_head=False)
  if parsed.tiny:
    config.total_steps = 60
    config.log_every = 10
    config.checkpoint_every = 60
  else:
    config.total_epochs = parsed.epochs
    config.warmup_epochs = 10 if parsed.method == 'dino' else 5
  return config
