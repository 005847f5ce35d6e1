"""Pieces shared by the evaluation configs in configs/eval/ (not a runnable config)."""

import ml_collections
from ml_collections import config_dict

from configs import common

NUM_CLASSES = {'imagenet2012': 1000, 'imagenet100': 100, 'digits': 10}


def model_overrides(drop_path: float = 0.0) -> ml_collections.ConfigDict:
  """config.model of an eval config: keys laid over the pretrained workdir's model config
  (the architecture itself always comes from `config.pretrained`)."""
  return ml_collections.ConfigDict({
      'dtype': 'float32', 'attention': 'xla', 'remat': False, 'drop_path': drop_path,
      'image_size': config_dict.placeholder(int),  # None → the pretrained image size
  })


def num_classes(arg: ml_collections.ConfigDict, data_name: str) -> int:
  """Classes of the data set (arg `num_classes=N` wins; required for other data sets)."""
  if arg.get('num_classes'):
    return int(arg.num_classes)
  if data_name not in NUM_CLASSES:
    raise ValueError(f'data {data_name!r}: pass num_classes=N in the config arg')
  return NUM_CLASSES[data_name]


def trained_eval_config(arg: ml_collections.ConfigDict,
                        objective: str) -> ml_collections.ConfigDict:
  """A protocol trained by the shared trainer (linear probe, fine-tune) on `pretrained`."""
  config = common.base_config()
  config.objective = objective
  config.pretrained = ''                                 # --config.pretrained=W (required)
  config.init_from = config.get_ref('pretrained')        # the trainer loads the encoder from it
  config.checkpoint_key = 'teacher'  # DINO workdirs: the EMA 'teacher' (DINO's eval) | 'student'
  config.model = model_overrides()
  config.data.name = common.DATASETS[arg.data]
  config.eval_batch_size = config_dict.placeholder(int)  # None → batch_size
  config.eval_every = config_dict.placeholder(int)       # None → only at the end
  return config


def evaluate_only_config(arg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Keys of a no-training run (`mode='evaluate'`): evaluators run once on `pretrained`."""
  config = ml_collections.ConfigDict()
  config.mode = 'evaluate'
  config.pretrained = ''
  config.checkpoint_key = 'teacher'  # DINO workdirs: the EMA 'teacher' (DINO's eval) | 'student'
  config.seed = 0
  config.batch_size = 256 if not arg.tiny else 64  # feature-extraction batch
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'devices': -1})
  config.model = model_overrides()
  config.data = common.base_config().data
  config.data.name = common.DATASETS[arg.data]
  config.data.augment = 'eval'
  config.plots = False
  config.plot_images = 6
  config.evals = ml_collections.ConfigDict()
  return config
