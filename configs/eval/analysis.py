"""Representation analysis without training: attention statistics (AAD, beyond-cls metrics),
feature spectra, Gardener-style block weight entropy; `--config.plots=True` writes E/plots/.

  python -m mimjax.main --config configs/eval/analysis.py:tiny --workdir workdirs/ana_tiny \
      --config.pretrained=workdirs/mae_tiny --config.plots=True
  python -m mimjax.main --config configs/eval/analysis.py:in1k --workdir E \
      --config.pretrained=W --config.data.data_dir=D --config.plots=True

Writes E/results.json (per-layer means), E/analysis/<name>.json (per layer × head arrays).
"""

import ml_collections

from configs import common
from configs.eval import eval_common


def get_config(arg: str = 'in1k'):
  arg = common.parse_arg(arg, model='vit_b', data='in1k', tiny=False)
  config = eval_common.evaluate_only_config(arg)
  if arg.tiny:
    config.data.name = 'digits' if arg.data == 'in1k' else config.data.name
    config.data.image_size = 32
    images = 256
  else:
    config.data.image_size = 224
    images = 50000  # beyond-cls: the whole ImageNet val set
  config.evals.attention = ml_collections.ConfigDict(
      {'module': 'attention_stats', 'num_images': images})
  config.evals.spectrum = ml_collections.ConfigDict(
      {'module': 'spectrum', 'num_images': images, 'pool': 'mean'})
  config.evals.gardener = ml_collections.ConfigDict(
      {'module': 'block_entropy', 'bins': 256, 'num_images': min(images, 1024)})
  return config
