"""End-to-end fine-tuning of a pretrained encoder for classification (MAE `main_finetune.py`).

Encoder from `config.pretrained` (loaded via `config.init_from`), `config.model` overrides
(drop_path); readout `config.finetune.pool`: 'mean' (MAE default: mean of the last block's
patch tokens → trainable fc_norm LayerNorm) or 'cls' (final-normed [cls]); Linear head
(trunc-normal 2e-5). RandAugment runs on the host (`data.augment='finetune'`); RandomErasing
(`finetune.reprob`, `remode`, `recount`) on the normalised images on device, then
Mixup/CutMix + label smoothing (timm 'batch' mode) — timm's order; layer-wise
lr decay via `config.optim.layer_decay`; optional parameter EMA (`finetune.ema_decay`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mimjax.data import erasing
from mimjax.data.mixup import mixup_cutmix
from mimjax.data.normalize import normalize_images
from mimjax.ema import ema_update
from mimjax.models import readout
from mimjax.models.vit import ViT
from mimjax.objectives import accuracy
from mimjax.objectives import pretrained
from mimjax.objectives.base import Objective


class ClassifierHead(nn.Module):
  """[fc_norm] → Linear(classes), MAE fine-tune init (head weight trunc-normal 2e-5, bias 0)."""
  num_classes: int
  fc_norm: bool

  @nn.compact
  def __call__(self, x):
    if self.fc_norm:
      x = nn.LayerNorm(epsilon=1e-6, name='fc_norm')(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(2e-5),
                    name='head')(x)


def _erasing_config(ft: ml_collections.ConfigDict) -> tuple[float, str, int]:
  """(reprob, remode, recount) of config.finetune (absent → no erasing), validated."""
  reprob = ft.get('reprob', 0.0)
  remode = ft.get('remode', 'pixel')
  recount = ft.get('recount', 1)
  if not isinstance(reprob, (int, float)) or not 0 <= reprob <= 1:
    raise ValueError(f'config.finetune.reprob={reprob!r}: expected a probability in [0, 1]')
  if remode not in erasing.MODES:
    raise ValueError(f'config.finetune.remode={remode!r}: expected one of {erasing.MODES}')
  if not isinstance(recount, int) or recount < 1:
    raise ValueError(f'config.finetune.recount={recount!r}: expected an int >= 1')
  return float(reprob), remode, recount


def make(config: ml_collections.ConfigDict) -> Objective:
  """Fine-tuning objective (see module doc)."""
  reprob, remode, recount = _erasing_config(config.finetune)  # before any file is read
  pre_config, path = pretrained.load_pretrained_config(config.pretrained)
  model_config = pretrained.merge_model_config(pre_config.model, config.get('model'))
  encoder = ViT(model_config)
  ft = config.finetune
  if ft.pool not in ('mean', 'cls'):
    raise ValueError(f"config.finetune.pool={ft.pool!r}: expected 'mean' or 'cls'")
  prefix = pretrained.num_prefix_tokens(model_config)
  head = ClassifierHead(ft.num_classes, fc_norm=ft.pool == 'mean')
  ema_decay = float(ft.get('ema_decay') or 0.0)

  def forward(params, images, train, rng=None):
    enc = pretrained.subtree(params, path)
    rngs = {'dropout': rng} if rng is not None else {}
    final, aux = encoder.apply({'params': enc}, images, train=train, return_layers=True, rngs=rngs)
    if ft.pool == 'mean':  # MAE global pool: the encoder's final norm is not used
      x = readout.global_pool(aux['layers'][-1], prefix)
    else:
      x = final[:, :prefix].mean(axis=1)
    return head.apply({'params': params['head']}, x.astype(jnp.float32))

  def init(rng, batch):
    enc_rng, head_rng = jax.random.split(rng)
    images = normalize_images(batch['image'][:1])
    enc = encoder.init(enc_rng, images)['params']
    width = jax.eval_shape(lambda: encoder.apply({'params': enc}, images)[0]).shape[-1]
    params = {**pretrained.nest(path, enc),
              'head': head.init(head_rng, jnp.zeros((1, width)))['params']}
    return params, ({'ema': params} if ema_decay else {})

  def loss(params, state, batch, rng, step):
    del step
    mix_rng, drop_rng, erase_rng = jax.random.split(rng, 3)
    images = normalize_images(batch['image'])
    if reprob > 0:  # timm: per-sample erasing in the transform, before the batch mixup
      images = erasing.random_erasing(erase_rng, images, probability=reprob, mode=remode,
                                      max_count=recount)
    images, targets = mixup_cutmix(
        mix_rng, images, batch['label'], ft.num_classes,
        mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, prob=ft.mix_prob,
        switch_prob=ft.switch_prob, smoothing=ft.label_smoothing)
    logits = forward(params, images, True, drop_rng)
    value = optax.softmax_cross_entropy(logits, targets).mean()
    return value, (state, {'soft_ce': value})

  def after_update(params, state, step):
    del step
    return {'ema': ema_update(state['ema'], params, ema_decay)} if ema_decay else state

  def predict(params, state, images):
    del state
    return forward(params, normalize_images(images), False)

  test = accuracy.test_accuracy_fn(config, predict)

  def evaluate(params, state):
    out = test(params, state)
    if ema_decay:
      out.update({f'ema_{k}': v for k, v in test(state['ema'], state).items()})
    return out

  return Objective(init=init, loss=loss, after_update=after_update if ema_decay else None,
                   evaluate=evaluate, encoder=path, predict=predict)
