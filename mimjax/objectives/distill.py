"""KD post-processing (SAM helps SSL, §3.3): distil a trained MRE teacher into the same ViT
without the segment bias, so the result needs no SAM masks at inference.

The teacher (`config.teacher`, a workdir of configs/mre_mae.py or configs/mre_dino.py) is
loaded with `pretrained.load_pretrained` (an MRE-DINO run: its EMA teacher, unless
`distill.checkpoint_key='student'`), kept frozen in the objective state and
always run with its segment maps; the student is the same architecture without the bias
(`config.model`, validated against the teacher's), initialised from the teacher's weights
(`distill.init='teacher'`, see docs/mre.md) and run without segment maps.

- method 'mae' (Eq. 10): L = L_MAE(student(x_vis)) + λ·MSE(A_student, A_teacher), where A are
  the post-softmax attention maps (B, heads, 1 + n_vis, 1 + n_vis) of the layers in
  `distill.layers`; the teacher encodes the same visible patches (x_vis, m_vis).
- method 'dino' (Eq. 8): DINO's cross-entropy without centering, teacher and student on the
  identical view (teacher with its masks, student without), teacher softmax at
  `distill.teacher_temp`, student log-softmax at `distill.student_temp`.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimjax import checkpoint
from mimjax import masking
from mimjax.data.normalize import normalize_images
from mimjax.models import layout
from mimjax.models.vit import model_dims
from mimjax.objectives import dino as dino_lib
from mimjax.objectives import mae as mae_lib
from mimjax.objectives import pretrained
from mimjax.objectives.base import Objective
from mimjax.tree import path_name

METHODS = ('mae', 'dino')


def default_config() -> ml_collections.ConfigDict:
  """config.distill: the choices the paper leaves open are keys (docs/mre.md)."""
  return ml_collections.ConfigDict({
      'method': 'mae',          # 'mae' (Eq. 10) or 'dino' (Eq. 8); must match the teacher
      'weight': 1.0,            # λ of Eq. 10 (paper: 1)
      # MAE-Lite's distillation, which §3.3 follows (mae_lite_distill_exp.py:
      # distill_attn_idx = (12,)), matches the attention of the last block only: 'last'.
      # 'all' averages over every block; or block indices, a tuple or '0,-1' (negative = from
      # the end).
      'layers': 'last',
      'init': 'teacher',        # 'teacher': start from the teacher's weights | 'scratch'
      'crops': 'global',        # DINO: 'global' (the 2 global crops) or 'all' crops
      'student_temp': 0.1,      # DINO
      'teacher_temp': 0.07,     # DINO: the teacher's final temperature, no centering
      'checkpoint_key': 'teacher',  # weights of an MRE-DINO workdir: its EMA 'teacher' | 'student'
  })


# ------------------------------------------------------------------------------------ numerics
def select_layers(maps: Sequence[jnp.ndarray], layers: Any) -> list:
  """The attention maps of `layers`: 'last', 'all', or block indices (negative from the end) as
  a tuple or a comma-separated string ('0,-1', what a `--config.distill.layers=` flag gives)."""
  if layers == 'all':
    return list(maps)
  if layers == 'last':
    layers = (-1,)
  if isinstance(layers, str):
    try:
      layers = tuple(int(t) for t in layers.split(',') if t.strip())
    except ValueError:
      raise ValueError(f'config.distill.layers={layers!r}: expected "last", "all" or block '
                       'indices such as "0,-1"') from None
  depth = len(maps)
  out = []
  for i in layers:
    if not -depth <= int(i) < depth:
      raise ValueError(f'config.distill.layers={layers!r}: index {i} outside a {depth}-block '
                       'encoder')
    out.append(maps[int(i)])
  if not out:
    raise ValueError('config.distill.layers is empty: expected "last", "all" or block indices')
  return out


def attention_mse(student_maps: Sequence[jnp.ndarray], teacher_maps: Sequence[jnp.ndarray],
                  layers: Any = 'last') -> jnp.ndarray:
  """Eq. 9 averaged over the chosen layers: mean over layers of MSE(A_s, A_t), each MSE a
  mean over batch, heads, queries and keys of post-softmax attention probabilities."""
  pairs = zip(select_layers(student_maps, layers), select_layers(teacher_maps, layers))
  errs = [jnp.mean(jnp.square(s.astype(jnp.float32) - jax.lax.stop_gradient(t).astype(
      jnp.float32))) for s, t in pairs]
  return sum(errs) / len(errs)


def kd_cross_entropy(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
                     student_temp: float, teacher_temp: float) -> jnp.ndarray:
  """Mean over examples of Σ_k −softmax(t/τ_t)_k · log_softmax(s/τ_s)_k (no centering)."""
  q = jax.lax.stop_gradient(jax.nn.softmax(teacher_logits.astype(jnp.float32) / teacher_temp))
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp)
  return -jnp.mean(jnp.sum(q * log_p, axis=-1))


def init_from_teacher(student: Any, teacher: Any) -> Any:
  """Every student leaf replaced by the teacher's leaf at the same path (the teacher's extra
  `segment_bias` params are dropped; either block layout loads into either); a clear error
  on a missing or mis-shaped leaf."""
  teacher = layout.to_layout(teacher, layout.is_scanned(student))

  def take(path, x):
    node = teacher
    for key in path:
      name = getattr(key, 'key', getattr(key, 'name', key))
      if name not in node:
        raise ValueError(f'teacher params have no {path_name(path)!r}: the student '
                         '(config.model) must be the teacher\'s architecture')
      node = node[name]
    if tuple(np.shape(node)) != tuple(x.shape):
      raise ValueError(f'{path_name(path)}: teacher shape {np.shape(node)} vs student {x.shape}')
    return jnp.asarray(node, x.dtype)
  return jax.tree_util.tree_map_with_path(take, student)


# ---------------------------------------------------------------------------------- objective
def _check_teacher(config: ml_collections.ConfigDict, teacher_cfg: ml_collections.ConfigDict):
  """The student must be the teacher's architecture without the bias."""
  method = config.distill.method
  if method not in METHODS:
    raise ValueError(f'config.distill.method={method!r}: expected one of {METHODS}')
  if teacher_cfg.objective != method:
    raise ValueError(f'config.teacher={config.teacher!r} was trained with objective '
                     f'{teacher_cfg.objective!r} but config.distill.method={method!r}')
  if config.model.get('segment_bias') is not None and config.model.segment_bias.enabled:
    raise ValueError('config.model.segment_bias.enabled must be False: the distilled student '
                     'runs without SAM masks')
  if model_dims(config.model) != model_dims(teacher_cfg.model):
    raise ValueError(f'config.model {model_dims(config.model)} differs from the teacher\'s '
                     f'{model_dims(teacher_cfg.model)} ({config.teacher}/config.json)')
  if config.distill.init not in ('teacher', 'scratch'):
    raise ValueError(f'config.distill.init={config.distill.init!r}: expected "teacher" or '
                     '"scratch"')
  if method == 'dino':
    # The KD heads run with params only; a BatchNorm head would need the teacher's running
    # statistics (and a choice of batch vs running ones) that this objective does not carry.
    for name, cfg in (('config', config), (f'the teacher\'s config ({config.teacher})',
                                           teacher_cfg)):
      if cfg.get('dino') is not None and cfg.dino.head.get('use_bn', False):
        raise ValueError(f'{name}: config.dino.head.use_bn=True is not supported by '
                         'distill.method=dino; use a teacher and student without BatchNorm '
                         'in the DINO head')
  if config.distill.crops not in ('global', 'all'):
    raise ValueError(f'config.distill.crops={config.distill.crops!r}: expected "global"/"all"')


def make(config: ml_collections.ConfigDict) -> Objective:
  """KD objective: student from `config.model`, teacher from `config.teacher` (a workdir)."""
  if not config.get('teacher'):
    raise ValueError('config.teacher: expected the MRE teacher\'s workdir (a finished run of '
                     'configs/mre_mae.py or configs/mre_dino.py)')
  _check_teacher(config, checkpoint.load_config(config.teacher))
  # The MRE-DINO teacher's EMA teacher by default (distill.checkpoint_key), as DINO evaluates.
  teacher = pretrained.load_pretrained(config.teacher, config.distill.checkpoint_key)
  teacher_cfg, teacher_params = teacher.config, teacher.params
  if config.distill.method == 'mae':
    return _make_mae(config, teacher_cfg, teacher_params)
  return _make_dino(config, teacher_cfg, teacher_params)


def _init_fn(config, student_init, teacher_params):
  def init(rng, batch):
    params = student_init(rng, batch)
    if config.distill.init == 'teacher':
      params = init_from_teacher(params, teacher_params)
    return params, {'teacher': jax.tree.map(jnp.asarray, teacher_params)}
  return init


def _make_mae(config, teacher_cfg, teacher_params) -> Objective:
  """Eq. 10: MAE loss of the bias-free student + λ·attention MSE to the frozen MRE teacher."""
  student, teacher = mae_lib.MAE(config), mae_lib.MAE(teacher_cfg)
  n = mae_lib.num_patches(config)
  layers, weight = config.distill.layers, config.distill.weight

  def student_init(rng, batch):
    images = normalize_images(batch['image'][:1])
    m = masking.random_masking(jax.random.key(0), 1, n, config.mask_ratio)
    return student.init({'params': rng}, images, m.keep_ids, m.restore_ids)['params']

  def loss(params, state, batch, rng, step):
    del step
    images = normalize_images(batch['image'])
    mask_rng, drop_rng = jax.random.split(rng)
    m = masking.random_masking(mask_rng, images.shape[0], n, config.mask_ratio)
    tokens, aux = student.apply({'params': params}, images, m.keep_ids, train=True,
                                return_attention=True, method='encode',
                                rngs={'dropout': drop_rng})
    pred = student.apply({'params': params}, tokens, m.restore_ids, train=True,
                         method='decode', rngs={'dropout': drop_rng})
    _, teacher_aux = teacher.apply({'params': state['teacher']}, images, m.keep_ids,
                                   segment_ids=mae_lib.batch_segment_ids(teacher_cfg, batch),
                                   return_attention=True, method='encode')
    mim = mae_lib.mae_loss(pred, images, m.mask, config.norm_pix)
    att = attention_mse(aux['attention'], teacher_aux['attention'], layers)
    value = mim + weight * att
    return value, (state, {'mae_loss': mim, 'attention_mse': att})

  return Objective(init=_init_fn(config, student_init, teacher_params), loss=loss)


def _make_dino(config, teacher_cfg, teacher_params) -> Objective:
  """Eq. 8: cross-entropy on identical views, no centering; teacher with masks, student not."""
  student, teacher = dino_lib.DINOModel(config), dino_lib.DINOModel(teacher_cfg)
  cfg = config.distill

  def views(batch):
    crops, _ = dino_lib.multicrop_views(config, batch)
    _, ids = dino_lib.multicrop_views(teacher_cfg, batch)
    if cfg.crops == 'global':
      crops, ids = crops[:1], ids and ids[:1]
    return crops, ids

  def student_init(rng, batch):
    crops, _ = views({k: v[:1] for k, v in batch.items()})
    return student.init({'params': rng}, crops)['params']

  def loss(params, state, batch, rng, step):
    del step
    crops, ids = views(batch)
    s = student.apply({'params': params}, crops, train=True, rngs={'dropout': rng})
    t = teacher.apply({'params': state['teacher']}, crops, ids)
    value = kd_cross_entropy(s, t, cfg.student_temp, cfg.teacher_temp)
    return value, (state, {'kd_loss': value})

  return Objective(init=_init_fn(config, student_init, teacher_params), loss=loss)
