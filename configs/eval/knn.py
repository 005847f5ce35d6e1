"""Weighted kNN (DINO: k = 20, T = 0.07) on frozen features, plus few-shot label fractions,
without training.

  python -m mimjax.main --config configs/eval/knn.py:tiny --workdir workdirs/knn_tiny \
      --config.pretrained=workdirs/mae_tiny
  python -m mimjax.main --config configs/eval/knn.py:in1k --workdir E --config.pretrained=W \
      --config.data.data_dir=D

Arg tokens: data set, tiny, pool=cls|mean, layer=N, probe=1 (also a cached-feature linear
probe over an lr grid). As an online monitor while pretraining, add to any train config:
`config.evals.knn = {'module': 'knn', 'every_steps': N}`. Writes E/results.json
(knn/top1, knn/top5, knn/top1@10%, knn/top1@1%, ...).
A DINO workdir is read at its EMA teacher, as DINO's own evaluations; add
`--config.checkpoint_key=student` for the student (docs/evaluation.md).
"""

import ml_collections

from configs import common
from configs.eval import eval_common


def get_config(arg: str = 'in1k'):
  arg = common.parse_arg(arg, model='vit_b', data='in1k', tiny=False, pool='cls', layer=-1,
                         probe=0)
  config = eval_common.evaluate_only_config(arg)
  if arg.tiny:
    config.data.name = 'digits' if arg.data == 'in1k' else config.data.name
    config.data.image_size = 32
  else:
    config.data.image_size = 224
  config.evals.knn = ml_collections.ConfigDict({
      'module': 'knn', 'k': 20, 'temperature': 0.07, 'pool': arg.pool, 'layer': arg.layer,
      'fractions': (1.0, 0.1, 0.01)})
  if arg.probe:
    config.evals.linear = ml_collections.ConfigDict({
        'module': 'linear', 'pool': arg.pool, 'layer': arg.layer, 'optimizer': 'sgd',
        'lrs': (0.01, 0.03, 0.1, 0.3), 'epochs': 30 if arg.tiny else 90, 'warmup_epochs': 3,
        'probe_batch_size': 256, 'fractions': (1.0, 0.1), 'cache_dir': ''})
  return config
