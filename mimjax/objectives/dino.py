"""DINO (Caron et al. 2021): self-distillation with an EMA teacher, multi-crop, centering.

Faithful to facebookresearch/dino `main_dino.py`: the student sees every crop, the teacher the
2 global crops; loss = mean over (teacher crop iq, student crop v ≠ iq) pairs of the cross-
entropy between the centred, sharpened teacher softmax and the student log-softmax; the center
(objective state) is updated after the loss from the teacher outputs of both global crops of
the global batch; the teacher (objective state, a copy of the student at init) follows the
student by EMA with a cosine momentum 0.996 → 1 in `after_update`. The optimizer side (per-
tensor clipping, wd cosine, last-layer freeze) lives in `mimjax.optim.dino_adamw`.

With `config.model.segment_bias.enabled` this is MRE-DINO (SAM helps SSL, Eq. 6): every crop
carries its own segment map (the data pipeline crops/flips it with the image), and student and
teacher get the patch ids of the view they encode.
"""

import re
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mimjax import ema
from mimjax.data import pipeline
from mimjax.data.normalize import normalize_images
from mimjax.durations import resolve_steps
from mimjax.models import batchnorm, layout, segment_bias
from mimjax.models.heads import DINOHead, default_dino_head_config
from mimjax.models.vit import ViT, model_dims
from mimjax.objectives.base import Objective
from mimjax.tree import path_name


def default_config() -> ml_collections.ConfigDict:
  """config.dino with the DINO README's ViT-S recipe values."""
  return ml_collections.ConfigDict({
      'head': default_dino_head_config(),
      'student_temp': 0.1,
      'teacher_temp': 0.07,               # final teacher temperature
      'warmup_teacher_temp': 0.04,        # linear (per epoch) from this ...
      'warmup_teacher_temp_epochs': 30,   # ... over this many epochs, then constant
      'center_momentum': 0.9,
      'momentum_teacher': 0.996,          # EMA momentum, cosine → 1 over training
      'init': 'dino',                     # 'dino': N(0, .02) Linears (DINO) | 'model' (MAE xavier)
  })


# ------------------------------------------------------------------------------------ numerics
def teacher_temperature(epoch, warmup_temp: float, temp: float, warmup_epochs: int):
  """DINO's schedule indexed per epoch: linspace(warmup_temp, temp, warmup_epochs)[epoch],
  then `temp` (note np.linspace includes its end point: epoch warmup_epochs − 1 reaches it)."""
  epoch = jnp.asarray(epoch, jnp.float32)
  if warmup_epochs <= 0:
    return jnp.full((), temp, jnp.float32)
  warm = warmup_temp + (temp - warmup_temp) * epoch / max(warmup_epochs - 1, 1)
  return jnp.where(epoch < warmup_epochs, warm, temp).astype(jnp.float32)


def dino_loss(student_out: jnp.ndarray, teacher_out: jnp.ndarray, center: jnp.ndarray,
              student_temp: float, teacher_temp) -> jnp.ndarray:
  """DINOLoss.forward: student (B, S, K) logits of all crops, teacher (B, T, K) logits of the
  global crops (the first T student crops are the same views); pairs with v == iq are
  skipped and the sum of per-pair batch means is divided by the number of pairs.

  Batch-major (DINO's tensors are crop-major) so the batch axis stays the sharded one."""
  num_s, num_t = student_out.shape[1], teacher_out.shape[1]
  if num_s <= num_t:
    raise ValueError(f'DINO loss needs more student crops ({num_s}) than teacher crops ({num_t})')
  log_p = jax.nn.log_softmax(student_out.astype(jnp.float32) / student_temp, axis=-1)
  q = jax.nn.softmax((teacher_out.astype(jnp.float32) - center) / teacher_temp, axis=-1)
  q = jax.lax.stop_gradient(q)
  # ce[iq, v] = mean over the batch of Σ_k −q_k log p_k
  ce = -jnp.einsum('bik,bvk->iv', q, log_p) / student_out.shape[0]
  keep = jnp.arange(num_t)[:, None] != jnp.arange(num_s)[None, :]
  return jnp.sum(jnp.where(keep, ce, 0.0)) / (num_t * num_s - num_t)


def collapse_metrics(student_out: jnp.ndarray, teacher_out: jnp.ndarray, center: jnp.ndarray,
                     student_temp: float, teacher_temp, loss: jnp.ndarray) -> dict:
  """What DINO users watch for collapse (natural log units, means over batch and crops):
  teacher_entropy H(q) of the centred, sharpened teacher; student_entropy H(p) at the student
  temperature; teacher_student_kl = loss − H(q) (each pair's CE is H(q) + KL(q‖p), and every
  teacher crop is in S − 1 pairs); output_uniformity = H(p) / ln K (1 = uniform output).

  Collapse to one dimension: both entropies → 0; to the uniform output: both → ln K, KL → 0.
  """
  entropy = lambda logits: jnp.mean(-jnp.sum(jax.nn.softmax(logits, -1) *
                                             jax.nn.log_softmax(logits, -1), -1))
  h_t = entropy((teacher_out.astype(jnp.float32) - center) / teacher_temp)
  h_s = entropy(student_out.astype(jnp.float32) / student_temp)
  q_mean = jnp.mean(jax.nn.softmax((teacher_out.astype(jnp.float32) - center) / teacher_temp,
                                   -1), axis=0)             # (T, K): batch-mean per crop
  h_batch = jnp.mean(-jnp.sum(q_mean * jnp.log(jnp.maximum(q_mean, 1e-30)), -1))
  h_s, h_t, h_batch = (jax.lax.stop_gradient(h) for h in (h_s, h_t, h_batch))
  return {'teacher_entropy': h_t, 'student_entropy': h_s, 'teacher_batch_entropy': h_batch,
          'teacher_student_kl': jax.lax.stop_gradient(loss) - h_t,
          'output_uniformity': h_s / jnp.log(student_out.shape[-1])}


def update_center(center: jnp.ndarray, teacher_out: jnp.ndarray, momentum: float) -> jnp.ndarray:
  """center ← m·center + (1 − m)·mean of the raw teacher logits over both globals and the
  whole (global) batch; DINO runs this after the loss, under no_grad."""
  k = teacher_out.shape[-1]
  batch_center = jnp.mean(teacher_out.reshape(-1, k).astype(jnp.float32), axis=0, keepdims=True)
  return jax.lax.stop_gradient(center * momentum + batch_center * (1 - momentum))


@layout.unrolled_view  # the names below are the unrolled blocks_{i}
def dino_init(params, rng: jax.Array):
  """DINO `_init_weights` on ViT params: every block Linear kernel N(0, .02) (biases are 0
  already); the patch-embed conv keeps PyTorch's default U(±1/√fan_in)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(rng, len(leaves))
  out = []
  for (path, x), key in zip(leaves, keys):
    name = path_name(path)
    if re.search(r'(^|/)blocks_\d+/.*/kernel$', name):
      x = 0.02 * jax.random.normal(key, x.shape, x.dtype)
    elif name.endswith('patch_embed/proj/kernel'):
      bound = (x.shape[0] * x.shape[1] * x.shape[2]) ** -0.5
      x = jax.random.uniform(key, x.shape, x.dtype, -bound, bound)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------------------- model
class DINOModel(nn.Module):
  """ViT backbone + DINO head; one backbone pass per run of equal-resolution crops
  (DINO's MultiCropWrapper), then one head pass on the concatenated cls tokens."""
  config: ml_collections.ConfigDict

  def setup(self):
    self.encoder = ViT(self.config.model)
    self.head = DINOHead(self.config.dino.head)

  def __call__(self, crops: Sequence[jnp.ndarray],
               segment_ids: Optional[Sequence[Optional[jnp.ndarray]]] = None, *,
               train: bool = False, encoder_train: Optional[bool] = None,
               batch_size: Optional[int] = None) -> jnp.ndarray:
    """crops: list of (N_i, H_i, W_i, 3) normalised images → head logits (Σ N_i, K), the runs
    one after the other; with `batch_size` B (crops batch-major, N_i = B·n_i) → (B, Σ n_i, K).

    `train`: the head's BatchNorm (`dino.head.use_bn`) uses batch statistics and, unless
    `encoder_train` (default `train`) says otherwise, the encoder its drop path. DINO's teacher
    is never put in eval mode but has no drop path: train=True, encoder_train=False."""
    segment_ids = segment_ids or [None] * len(crops)
    encoder_train = train if encoder_train is None else encoder_train
    cls = [self.encoder(x, segment_ids=ids, train=encoder_train)[0][:, 0]
           for x, ids in zip(crops, segment_ids)]
    if batch_size is None:
      # One head pass on all crops (MultiCropWrapper): BatchNorm statistics span every crop.
      return self.head(jnp.concatenate(cls, axis=0), train=train)
    # The same pass with each example's crops side by side, so the batch axis stays the split
    # one: runs stacked along it (and sliced apart after the head, a pad in the backward
    # pass) made XLA:TPU all-gather the (B·2, K) global-crop logits of the whole batch.
    dim = cls[0].shape[-1]
    rows = jnp.concatenate([c.reshape(batch_size, -1, dim) for c in cls], axis=1)
    out = self.head(rows.reshape(-1, dim), train=train)
    return out.reshape(batch_size, -1, out.shape[-1])


def batch_major(x: jnp.ndarray) -> jnp.ndarray:
  """(B, n, ...) → (B·n, ...), row b·n + c = crop c of example b.

  DINO stacks crop-major ([crop 0 batch; crop 1 batch; ...]); merging with the batch outer
  instead keeps a data-axis sharding of B on the merged axis (a crop-major merge of a sharded
  B cannot stay split, and XLA gathers every crop onto every device). The loss only pairs
  crops of the same example, so the order changes no value.
  """
  return x.reshape((-1,) + x.shape[2:])


def multicrop_views(config: ml_collections.ConfigDict, batch: dict):
  """The 'dino' augment's batch → ([globals, locals?], [their patch segment ids or None]).

  Segment ids (MRE): the majority id of each patch of each crop's own segment map, computed
  by the data pipeline (data.segment_patch_size).
  """
  crops, seg_keys = [batch_major(normalize_images(batch['global']))], ['segment_ids_global']
  if batch.get('local') is not None and batch['local'].shape[1] > 0:
    crops.append(batch_major(normalize_images(batch['local'])))
    seg_keys.append('segment_ids_local')
  seg_cfg = config.model.get('segment_bias')
  if seg_cfg is None or not seg_cfg.enabled:
    return crops, None
  p = model_dims(config.model)['patch_size']
  ids = [batch_major(segment_bias.checked_ids(batch, k, x.shape[1], p))
         for k, x in zip(seg_keys, crops)]
  return crops, ids


def schedule_lengths(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(total steps, steps per epoch) of this run; an epoch is N // batch steps (drop_last)."""
  num_train = pipeline.num_examples(config.data, 'train')
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'config.batch_size={config.batch_size} exceeds the {num_train} training '
                     'examples: DINO schedules are per epoch')
  return resolve_steps('total', config, num_train), steps_per_epoch


def validate(config: ml_collections.ConfigDict) -> None:
  """One clear error naming the first bad DINO key."""
  if config.data.augment != 'dino':
    raise ValueError(f'config.data.augment={config.data.augment!r}: DINO needs "dino" '
                     '(2 global + N local crops)')
  if config.dino.init not in ('dino', 'model'):
    raise ValueError(f'config.dino.init={config.dino.init!r}: expected "dino" or "model"')
  for key in ('student_temp', 'teacher_temp', 'warmup_teacher_temp'):
    if not config.dino[key] > 0:
      raise ValueError(f'config.dino.{key}={config.dino[key]}: expected > 0')
  if not 0 <= config.dino.center_momentum < 1:
    raise ValueError(f'config.dino.center_momentum={config.dino.center_momentum}: expected [0, 1)')


def make(config: ml_collections.ConfigDict) -> Objective:
  """DINO objective from `config.model`, `config.dino` and the data/duration keys."""
  validate(config)
  cfg = config.dino
  model = DINOModel(config)
  total_steps, steps_per_epoch = schedule_lengths(config)

  use_bn = cfg.head.get('use_bn', False)

  def init(rng, batch):
    crops, ids = multicrop_views(config, {k: v[:1] for k, v in batch.items()})
    init_rng, dino_rng = jax.random.split(rng)
    params, stats = batchnorm.init(model, init_rng, crops, ids)
    if cfg.init == 'dino':
      params = dino_init(params, dino_rng)
    teacher = jax.tree.map(jnp.copy, params)  # DINO: teacher.load_state_dict(student)
    state = {'teacher': teacher, 'center': jnp.zeros((1, cfg.head.out_dim), jnp.float32)}
    if use_bn:  # head BatchNorm running statistics: the student's and the teacher's own
      state['batch_stats'] = {'student': stats, 'teacher': jax.tree.map(jnp.copy, stats)}
    return params, state

  def loss(params, state, batch, rng, step):
    crops, ids = multicrop_views(config, batch)
    b = batch['global'].shape[0]
    stats = state.get('batch_stats', {'student': {}, 'teacher': {}})
    student, student_stats = batchnorm.apply(model, params, stats['student'], crops, ids,
                                             train=True, rngs={'dropout': rng}, batch_size=b)
    # DINO never calls teacher.eval(): its head BatchNorm normalises with the teacher's batch
    # statistics and moves the teacher's running ones; its encoder has no drop path.
    teacher, teacher_stats = batchnorm.apply(model, state['teacher'], stats['teacher'],
                                             crops[:1], ids and ids[:1], train=use_bn,
                                             encoder_train=False, batch_size=b)
    teacher = jax.lax.stop_gradient(teacher)
    temp = teacher_temperature(step // steps_per_epoch, cfg.warmup_teacher_temp,
                               cfg.teacher_temp, cfg.warmup_teacher_temp_epochs)
    value = dino_loss(student, teacher, state['center'], cfg.student_temp, temp)
    metrics = collapse_metrics(student, teacher, state['center'], cfg.student_temp, temp, value)
    center = update_center(state['center'], teacher, cfg.center_momentum)
    new_state = {**state, 'center': center}
    if use_bn:
      new_state['batch_stats'] = jax.lax.stop_gradient(
          {'student': student_stats, 'teacher': teacher_stats})
    return value, (new_state,
                   {'dino_loss': value, 'teacher_temp': temp,
                    'center_norm': jnp.linalg.norm(center), **metrics})

  def after_update(params, state, step):
    momentum = ema.cosine_schedule(cfg.momentum_teacher, 1.0, step, total_steps)
    # Parameters only, as DINO's EMA loop over .parameters(): each network keeps its own
    # BatchNorm running statistics.
    return {**state, 'teacher': ema.ema_update(state['teacher'], params, momentum)}

  return Objective(init=init, loss=loss, after_update=after_update, teacher=('teacher',))
