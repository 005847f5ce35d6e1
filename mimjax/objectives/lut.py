"""LUT (Kim et al., 2024): MAE + a broader-contextualisation loss on the unmasked tokens.

L = L_MIM + α·L_BC,  L_BC = 2 − 2·cos(ū_θ, v̄): ū_θ = predictor(projector(mean of the online
encoder's visible tokens)), v̄ = projector_ema(mean of the EMA encoder's tokens of the full,
unmasked view). Default = the official code (naver-ai/lut); `config.lut` switches to the
paper's description (docs/lut.md lists every difference).

Params: {'encoder', 'decoder'} (exactly MAE's) + {'projector', 'predictor'}.
State: {'batch_stats': {'projector', 'predictor'}} (online BatchNorm running stats) and
{'target': {'params': {'encoder', 'projector'}, 'batch_stats': {'projector'}}}, the EMA target.
"""

import jax
import jax.numpy as jnp
import ml_collections

from mimjax import masking
from mimjax.data.normalize import normalize_images
from mimjax.durations import resolve_steps
from mimjax.ema import cosine_schedule, ema_update
from mimjax.models import batchnorm
from mimjax.models import projector as projector_lib
from mimjax.models.vit import ViT, model_dims, pool_tokens
from mimjax.objectives import mae
from mimjax.objectives.base import Objective

TARGET_BN_STATS = ('running', 'batch')


def default_config() -> ml_collections.ConfigDict:
  """config.lut with the official code's defaults (ViT-B row)."""
  return ml_collections.ConfigDict({
      'alpha': 0.25,               # w_bc: 0.25 ViT-B, 1.0 ViT-S
      'momentum': 0.996,           # target EMA, cosine → momentum_final over training
      'momentum_final': 1.0,
      'symmetric': True,           # code: both views online (disjoint visible sets), 2 pairs
      'target_bn_stats': 'running',  # code: target in eval mode; 'batch': batch statistics
      'projector': projector_lib.default_config(),
      'predictor': projector_lib.default_config(),
  })


def cosine_distance(p: jnp.ndarray, z: jnp.ndarray) -> jnp.ndarray:
  """2 − 2·cos(p, z) = ‖p̄ − z̄‖² per row, ℓ2-normalised as torch F.normalize (eps 1e-12)."""
  p = p.astype(jnp.float32)
  z = z.astype(jnp.float32)
  p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  return 2.0 - 2.0 * jnp.sum(p * z, axis=-1)


def bc_loss(online: dict, target: dict) -> jnp.ndarray:
  """L_BC: batch-mean cosine distance averaged over pairs (online view v, target view t ≠ v).

  `online` / `target` map view index → (B, D) outputs (engine_lut.py loop over teacher_outs ×
  student_outs, skipping equal views).
  """
  terms = [cosine_distance(q, jax.lax.stop_gradient(z)).mean()
           for v, q in online.items() for t, z in target.items() if v != t]
  if not terms:
    raise ValueError('bc_loss: no (online, target) pair with different views')
  return sum(terms) / len(terms)


def second_visible_ids(noise: jnp.ndarray, mask_ratio: float) -> jnp.ndarray:
  """Official LUT view-2 visible set: ids_shuffle[:, keep:2·keep] of view 1's noise draw,
  disjoint from view 1's ids_shuffle[:, :keep]."""
  keep = masking.num_keep(noise.shape[-1], mask_ratio)
  return jnp.argsort(noise, axis=-1).astype(jnp.int32)[..., keep:2 * keep]


def _encode_and_decode(module: mae.MAE, images, keep_ids, restore_ids, segment_ids, *, train):
  """MAE.__call__ that also returns the encoder tokens (for the pooled online feature)."""
  tokens, _ = module.encode(images, keep_ids, segment_ids=segment_ids, train=train)
  return tokens, module.decode(tokens, restore_ids, train=train)


def _head_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  head = ml_collections.ConfigDict(config.lut[name].to_dict())
  head.out_dim = head.out_dim or model_dims(config.model)['width']
  head.dtype = config.model.get('dtype', 'float32')
  return head


def total_steps(config: ml_collections.ConfigDict) -> int:
  """Training length in steps (the EMA momentum schedule spans it)."""
  if config.get('total_steps') is not None:
    return int(config.total_steps)
  from mimjax.data import pipeline  # only epochs/examples need the data set size
  return resolve_steps('total', config, pipeline.num_examples(config.data, 'train'))


def validate(config: ml_collections.ConfigDict) -> None:
  """LUT-specific keys: one clear error naming the key and what was expected."""
  lut = config.get('lut')
  if lut is None:
    raise ValueError('config.lut is missing (see configs/lut.py)')
  if config.data.get('augment') != 'lut':
    raise ValueError(f'config.data.augment={config.data.get("augment")!r}: LUT needs "lut" '
                     '(two views per image)')
  if config.get('masking', 'random') != 'random':
    raise ValueError(f'config.masking={config.masking!r}: LUT expects "random" (view 2\'s '
                     'visible set is the next slice of view 1\'s noise argsort)')
  if config.get('target', 'pixel') != 'pixel':
    raise ValueError(f'config.target={config.target!r}: LUT reconstructs pixels, expected "pixel"')
  if not lut.alpha >= 0:
    raise ValueError(f'config.lut.alpha={lut.alpha!r}: expected a value >= 0')
  for key in ('momentum', 'momentum_final'):
    if not 0.0 <= lut[key] <= 1.0:
      raise ValueError(f'config.lut.{key}={lut[key]!r}: expected a value in [0, 1]')
  if lut.target_bn_stats not in TARGET_BN_STATS:
    raise ValueError(f'config.lut.target_bn_stats={lut.target_bn_stats!r}: expected one of '
                     f'{TARGET_BN_STATS}')
  if not isinstance(lut.symmetric, bool):
    raise ValueError(f'config.lut.symmetric={lut.symmetric!r}: expected True or False')
  if lut.symmetric and config.mask_ratio < 0.5:
    raise ValueError(f'config.mask_ratio={config.mask_ratio}: config.lut.symmetric=True gives '
                     'view 2 the next int(N·(1−ratio)) shuffled patches, so expected >= 0.5')
  for name in ('projector', 'predictor'):
    projector_lib.validate_config(lut[name], f'config.lut.{name}')


def make(config: ml_collections.ConfigDict) -> Objective:
  """LUT objective from `config.model`, `config.mask_ratio`, `config.norm_pix`, `config.lut`."""
  validate(config)
  lut = config.lut
  model = mae.MAE(config)
  encoder = ViT(config.model)
  projector = projector_lib.ProjectionMLP(_head_config(config, 'projector'))
  predictor = projector_lib.ProjectionMLP(_head_config(config, 'predictor'))
  n = mae.num_patches(config)
  width = model_dims(config.model)['width']
  online_views = (0, 1) if lut.symmetric else (0,)
  target_views = (0, 1) if lut.symmetric else (1,)
  steps = total_steps(config)

  def view(batch, v):
    """Normalised images and patch segment ids of view v ((B, 2, ...) batches)."""
    images = batch['image']
    if images.ndim != 5 or images.shape[1] != 2:
      raise ValueError(f'LUT expects batch["image"] of shape (B, 2, H, W, 3), got '
                       f'{images.shape}; set config.data.augment="lut"')
    segs = {'segment_ids': batch['segment_ids'][:, v]} if 'segment_ids' in batch else {}
    return normalize_images(images[:, v]), mae.batch_segment_ids(config, segs)

  def init(rng, batch):
    mae_rng, proj_rng, pred_rng = jax.random.split(rng, 3)
    first = {k: v[:1, 0] for k, v in batch.items() if k in ('image', 'segment_ids')}
    params, _ = mae.make(config).init(mae_rng, first)  # MAE's own init, reused as is
    feature = jnp.zeros((2, width), jnp.float32)
    params['projector'], proj_stats = batchnorm.init(projector, proj_rng, feature)
    params['predictor'], pred_stats = batchnorm.init(predictor, pred_rng, feature)
    # The target starts as a copy of the online encoder + projector (deepcopy in the code);
    # the decoder and predictor copies of the code's whole-model EMA are never used: dropped.
    target = {'params': {'encoder': params['encoder'], 'projector': params['projector']},
              'batch_stats': {'projector': proj_stats}}
    state = {'batch_stats': {'projector': proj_stats, 'predictor': pred_stats},
             'target': jax.tree.map(jnp.copy, target)}
    return params, state

  def target_outputs(target, batch):
    """Projector outputs of the EMA encoder on each full (unmasked) target view; no gradient."""
    target = jax.lax.stop_gradient(target)
    out, stats = {}, target['batch_stats']['projector']
    for v in target_views:
      images, seg = view(batch, v)
      tokens, _ = encoder.apply({'params': target['params']['encoder']}, images,
                                segment_ids=seg, train=False)
      # 'running': eval-mode BN (code); 'batch': this batch's statistics, running ones unused.
      z, _ = batchnorm.apply(projector, target['params']['projector'], stats,
                             pool_tokens(tokens, 'mean'),
                             train=lut.target_bn_stats == 'batch')
      out[v] = jax.lax.stop_gradient(z)
    return out

  def loss(params, state, batch, rng, step):
    mask_rng, drop_rng = jax.random.split(rng)  # as mae.make: α = 0 gives MAE's loss exactly
    images, seg = view(batch, 0)
    noise = jax.random.uniform(mask_rng, (images.shape[0], n))
    m = masking.random_masking_from_noise(noise, config.mask_ratio)
    mae_params = {'encoder': params['encoder'], 'decoder': params['decoder']}
    tokens, pred = model.apply({'params': mae_params}, images, m.keep_ids, m.restore_ids, seg,
                               train=True, rngs={'dropout': drop_rng}, method=_encode_and_decode)
    mae_value = mae.mae_loss(pred, images, m.mask, config.norm_pix)
    pooled = {0: pool_tokens(tokens, 'mean')}  # mean of the visible patch tokens (cls excluded)
    if 1 in online_views:
      images2, seg2 = view(batch, 1)
      keep2 = second_visible_ids(noise, config.mask_ratio)
      tokens2, _ = model.apply({'params': mae_params}, images2, keep2, segment_ids=seg2,
                               train=True, rngs={'dropout': jax.random.fold_in(drop_rng, 1)},
                               method=mae.MAE.encode)
      pooled[1] = pool_tokens(tokens2, 'mean')

    # Projector then predictor per view, as in the code: BN statistics are per view and the
    # running statistics are updated once per view, view 0 first.
    proj_stats, pred_stats = state['batch_stats']['projector'], state['batch_stats']['predictor']
    online = {}
    for v, feature in pooled.items():
      z, proj_stats = batchnorm.apply(projector, params['projector'], proj_stats, feature,
                                      train=True)
      online[v], pred_stats = batchnorm.apply(predictor, params['predictor'], pred_stats, z,
                                              train=True)
    bc_value = bc_loss(online, target_outputs(state['target'], batch))
    total = mae_value + lut.alpha * bc_value
    new_state = {**state, 'batch_stats': {'projector': proj_stats, 'predictor': pred_stats}}
    q = online[0] / jnp.maximum(jnp.linalg.norm(online[0], axis=-1, keepdims=True), 1e-12)
    metrics = {'mae_loss': mae_value, 'bc_loss': bc_value,
               # Collapse monitor: per-dim std of the normalised online output (0 = collapsed;
               # ≈ 1/√D for a spread-out representation).
               'online_std': jnp.std(q, axis=0).mean(),
               'target_momentum': momentum(step)}
    return total, (new_state, metrics)

  def momentum(step):
    return cosine_schedule(lut.momentum, lut.momentum_final, step, steps)

  def after_update(params, state, step):
    """target ← m·target + (1 − m)·online for encoder, projector and its BN running stats."""
    online = {'params': {'encoder': params['encoder'], 'projector': params['projector']},
              'batch_stats': {'projector': state['batch_stats']['projector']}}
    return {**state, 'target': ema_update(state['target'], online, momentum(step))}

  return Objective(init=init, loss=loss, after_update=after_update)
