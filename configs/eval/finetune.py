"""Fine-tuning a pretrained encoder for classification (MAE recipe).

  python -m mimjax.main --config configs/eval/finetune.py:tiny --workdir workdirs/ft_tiny \
      --config.pretrained=workdirs/mae_tiny
  python -m mimjax.main --config configs/eval/finetune.py:vit_b,in1k --workdir E \
      --config.pretrained=W --config.data.data_dir=D

Rows: vit_b (100 ep, blr 5e-4, layer decay 0.65, drop path 0.1), vit_l / vit_h (50 ep, blr 1e-3,
ld 0.75, drop path 0.2 / 0.3). Augmentation: RandomResizedCrop (0.08, 1) bicubic → flip →
RandAugment rand-m9-mstd0.5-inc1 (host, data.augment='finetune') → RandomErasing p 0.25 'pixel'
(device) → Mixup 0.8 / CutMix 1.0 / label smoothing 0.1. AdamW (0.9, 0.999) wd 0.05, 5 warm-up
epochs, min lr 1e-6. Writes E/results.json (eval/top1, eval/top5).
"""

import ml_collections

from configs import common
from configs.eval import eval_common

RECIPES = {  # model → (epochs, blr, layer_decay, drop_path)
    'vit_b': (100, 5e-4, 0.65, 0.1), 'vit_l': (50, 1e-3, 0.75, 0.2), 'vit_h': (50, 1e-3, 0.75, 0.3),
}


def get_config(arg: str = 'vit_b,in1k'):
  arg = common.parse_arg(arg, model='vit_b', data='in1k', epochs=0, tiny=False, num_classes=0,
                         pool='mean')
  config = eval_common.trained_eval_config(arg, 'finetune')
  epochs, blr, ld, dp = RECIPES.get(arg.model, RECIPES['vit_b'])
  config.model = eval_common.model_overrides(drop_path=dp)
  # MAE fine-tuning trains the loaded pos_embed (sincos or learned): no stop-gradient in the
  # ViT, nothing frozen; it gets the layer-0 lr scale and no weight decay (util/lr_decay.py).
  config.model.freeze_pos_embed = False
  config.finetune = ml_collections.ConfigDict({
      'pool': arg.pool, 'num_classes': eval_common.num_classes(arg, config.data.name),
      'mixup': 0.8, 'cutmix': 1.0, 'mix_prob': 1.0, 'switch_prob': 0.5,
      'label_smoothing': 0.1, 'ema_decay': 0.0,
      'reprob': 0.25, 'remode': 'pixel', 'recount': 1})  # timm RandomErasing (MAE defaults)
  config.optim.b2 = 0.999
  config.optim.weight_decay = 0.05
  config.optim.base_lr = blr
  config.optim.min_lr = 1e-6
  config.optim.layer_decay = ld
  config.optim.frozen = ()
  # MAE no_weight_decay_list {pos_embed, cls_token, dist_token}; reg_token holds the other
  # prefix tokens (SemanticMIM proxies: one cls_token tensor officially), treated alike.
  config.optim.no_decay = ('pos_embed$', 'cls_token$', 'reg_token$')
  config.data.augment = 'finetune'          # RRC → flip → RandAugment (timm create_transform)
  config.data.crop_scale = (0.08, 1.0)
  config.data.randaug_num_ops = 2           # timm 'rand-m9-mstd0.5-inc1'
  config.data.randaug_magnitude = 9.0
  config.data.randaug_mstd = 0.5
  if arg.tiny:
    config.data.name = 'digits' if arg.data == 'in1k' else config.data.name
    config.finetune.num_classes = eval_common.num_classes(arg, config.data.name)
    config.data.image_size = 32
    config.data.crop_scale = (0.35, 1.0)
    config.batch_size = 64
    config.total_steps = 200
    config.warmup_steps = 20
    # 200 steps of a 2-block ViT on 1.8k digits underfit through the ImageNet recipe's
    # regularisers (with Mixup/CutMix, RandAugment and erasing at lr 1e-3: top-1 35.7, the
    # training loss stays at ln 10; without them: 68.0 at lr 1e-3, 81.5 at 3e-3, linear probe
    # 67.3 on the same encoder). The tiny row keeps the recipe's shape (layer decay, drop
    # path, label smoothing, RRC + flip) and turns the regularisers off.
    config.optim.lr = 3e-3
    config.finetune.update({'mixup': 0.0, 'cutmix': 0.0, 'reprob': 0.0})
    config.data.randaug_num_ops = 0
    config.log_every = 20
    config.checkpoint_every = 100
  else:
    config.data.image_size = 224
    config.batch_size = 1024
    config.total_epochs = arg.epochs or epochs
    config.warmup_epochs = 5
    config.log_every = 100
    config.checkpoint_every = 2000
  return config
