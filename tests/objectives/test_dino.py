"""DINO numerics vs PyTorch transcriptions of facebookresearch/dino (main_dino.py, utils.py),
the DINO AdamW (per-tensor clip, wd cosine, last-layer freeze) vs torch.optim.AdamW, and
tiny DINO / MRE-DINO runs through the trainer."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from configs import dino as dino_config
from configs import mre_dino as mre_dino_config
from mimjax import ema, optim, plan, sharding
from mimjax.data import pipeline
from mimjax.data.builders import tfds_io
from mimjax.data.normalize import normalize_images
from mimjax.models import batchnorm
from mimjax.objectives import dino, distill
from mimjax.train import trainer
from tests.objectives.dino_torch_ref import DINOLoss as TorchDINOLoss  # main_dino.py


def torch_clip_gradients(params, clip):
  """dino/utils.py clip_gradients."""
  for p in params:
    if p.grad is not None:
      param_norm = p.grad.data.norm(2)
      clip_coef = clip / (param_norm + 1e-6)
      if clip_coef < 1:
        p.grad.data.mul_(clip_coef)


def test_teacher_temperature_schedule_values():
  ref = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(270) * 0.07))
  for epoch in (0, 1, 13, 28, 29, 30, 150, 299):
    np.testing.assert_allclose(float(dino.teacher_temperature(epoch, 0.04, 0.07, 30)),
                               ref[epoch], rtol=1e-6)
  assert float(dino.teacher_temperature(5, 0.04, 0.07, 0)) == pytest.approx(0.07)


def test_dino_loss_and_center_update_match_official():
  rng = np.random.default_rng(0)
  ncrops, b, k, epochs = 5, 3, 17, 10
  ref = TorchDINOLoss(k, ncrops, 0.04, 0.07, 4, epochs)
  center = jnp.zeros((1, k))
  for epoch in (0, 2, 7):  # three calls: the center moves between them
    student = rng.normal(size=(ncrops * b, k)).astype(np.float32)
    teacher = 3 * rng.normal(size=(2 * b, k)).astype(np.float32)
    expected = float(ref(torch.from_numpy(student), torch.from_numpy(teacher), epoch))
    temp = dino.teacher_temperature(epoch, 0.04, 0.07, 4)
    # torch chunks crop-major (crop, batch); mimjax takes (batch, crop)
    s_bm = jnp.swapaxes(jnp.asarray(student).reshape(ncrops, b, k), 0, 1)
    t_bm = jnp.swapaxes(jnp.asarray(teacher).reshape(2, b, k), 0, 1)
    ours = dino.dino_loss(s_bm, t_bm, center, 0.1, temp)
    np.testing.assert_allclose(float(ours), expected, rtol=1e-5)
    center = dino.update_center(center, t_bm, 0.9)
    np.testing.assert_allclose(np.asarray(center), ref.center.numpy(), rtol=1e-5, atol=1e-7)


def test_dino_loss_pair_exclusion_by_hand():
  # 2 teacher crops, 3 student crops, batch 1, K = 2: pairs (0,1),(0,2),(1,0),(1,2) → / 4.
  s = jnp.array([[[0.0, 0.0], [0.1, 0.0], [0.0, 0.2]]])           # (B=1, S=3, K=2)
  t = jnp.array([[[0.0, 0.0], [0.0, 0.04 * np.log(3.0)]]])         # (B=1, T=2, K=2)
  q = [np.array([0.5, 0.5]), np.array([0.25, 0.75])]
  logp = [np.log(np.exp(x / 0.1) / np.exp(x / 0.1).sum()) for x in np.asarray(s)[0]]
  pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
  expected = sum(-(q[i] * logp[v]).sum() for i, v in pairs) / 4
  ours = dino.dino_loss(s, t, jnp.zeros((1, 2)), 0.1, 0.04)
  np.testing.assert_allclose(float(ours), expected, rtol=1e-5)


def test_per_tensor_clipping_matches_official():
  rng = np.random.default_rng(1)
  grads = {'a': rng.normal(size=(4, 5)).astype(np.float32) * 3,     # norm > 3: clipped
           'b': rng.normal(size=(7,)).astype(np.float32) * 0.1}      # norm < 3: untouched
  ps = [torch.zeros(g.shape, requires_grad=True) for g in grads.values()]
  for p, g in zip(ps, grads.values()):
    p.grad = torch.from_numpy(g.copy())
  torch_clip_gradients(ps, 3.0)
  out, _ = optim.clip_per_tensor(3.0).update(jax.tree.map(jnp.asarray, grads), optax.EmptyState())
  for p, key in zip(ps, grads):
    np.testing.assert_allclose(np.asarray(out[key]), p.grad.numpy(), rtol=1e-6)
  assert np.linalg.norm(np.asarray(out['a'])) == pytest.approx(3.0, rel=1e-5)


def _dino_optim_config(freeze_steps):
  return ml_collections.ConfigDict({
      'name': 'adamw', 'lr': 0.1, 'min_lr': 0.0, 'b1': 0.9, 'b2': 0.999, 'eps': 1e-8,
      'weight_decay': 0.04, 'weight_decay_end': 0.4, 'clip_per_tensor': 3.0,
      'freeze': ('last_layer',), 'freeze_steps': freeze_steps, 'freeze_epochs': None,
      'frozen': (), 'no_decay': ()})


def test_dino_adamw_matches_torch_with_last_layer_freeze():
  """Per-iteration lr/wd schedules, per-tensor clip, grads of `last_layer` set to None for the
  first 2 steps (torch skips them: no update, no decay, no moments, no step count)."""
  rng = np.random.default_rng(2)
  init = {'head': {'mlp_0': {'kernel': rng.normal(size=(3, 4)), 'bias': rng.normal(size=(4,))},
                   'last_layer_weight_v': rng.normal(size=(4, 6))}}
  init = jax.tree.map(lambda x: np.asarray(x, np.float32), init)
  grads = [jax.tree.map(lambda x: np.asarray(rng.normal(size=x.shape) * 2, np.float32), init)
           for _ in range(5)]
  total, warm, freeze = 5, 2, 2
  cfg = _dino_optim_config(freeze)
  tx, lr = optim.make_optimizer(cfg, init, total_steps=total, warmup_steps=warm, batch_size=256)
  wd = lambda i: float(ema.cosine_schedule(0.04, 0.4, i, total))

  names = ['head/mlp_0/kernel', 'head/mlp_0/bias', 'head/last_layer_weight_v']
  get = lambda tree, n: tree['head']['last_layer_weight_v'] if 'last' in n else \
      tree['head']['mlp_0'][n.split('/')[-1]]
  tp = {n: torch.nn.Parameter(torch.from_numpy(get(init, n).copy())) for n in names}
  regularized = [tp['head/mlp_0/kernel'], tp['head/last_layer_weight_v']]
  topt = torch.optim.AdamW([{'params': regularized}, {'params': [tp['head/mlp_0/bias']],
                                                      'weight_decay': 0.0}], lr=0.1)

  params = jax.tree.map(jnp.asarray, init)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for it in range(total):
    for i, group in enumerate(topt.param_groups):
      group['lr'] = float(lr(it))
      if i == 0:
        group['weight_decay'] = wd(it)
    topt.zero_grad()
    for n in names:
      tp[n].grad = torch.from_numpy(get(grads[it], n).copy())
    torch_clip_gradients(tp.values(), 3.0)
    if it < freeze:  # cancel_gradients_last_layer
      tp['head/last_layer_weight_v'].grad = None
    topt.step()
    updates, state = step(params, state, jax.tree.map(jnp.asarray, grads[it]))
    params = optax.apply_updates(params, updates)
    if it < freeze:
      np.testing.assert_array_equal(np.asarray(params['head']['last_layer_weight_v']),
                                    init['head']['last_layer_weight_v'])
      late = state.inner_states['late'].inner_state.inner   # the late group's own AdamW
      adam = late[1]
      assert int(adam.count) == 0
      assert float(jnp.abs(adam.mu['head']['last_layer_weight_v']).max()) == 0.0
      assert float(jnp.abs(adam.nu['head']['last_layer_weight_v']).max()) == 0.0
    for n in names:
      np.testing.assert_allclose(np.asarray(get(params, n)), tp[n].detach().numpy(),
                                 rtol=2e-5, atol=2e-6, err_msg=f'{n} at step {it}')
  assert not np.allclose(np.asarray(params['head']['last_layer_weight_v']),
                         init['head']['last_layer_weight_v'])


def test_mae_optimizer_unchanged_without_dino_keys():
  cfg = _dino_optim_config(None)
  for key in ('weight_decay_end', 'clip_per_tensor'):
    cfg[key] = None
  cfg.freeze = ()
  assert not optim.uses_dino_adamw(cfg)
  cfg.freeze_epochs = 1
  cfg.freeze = ('last_layer',)
  with pytest.raises(ValueError, match='freeze_epochs needs the data-set size'):
    optim.make_optimizer(cfg, {'w': jnp.ones((2, 2))}, total_steps=4, warmup_steps=0,
                         batch_size=8)
  assert optim.freeze_steps(cfg, num_examples=1500, batch_size=64) == 23


# ---------------------------------------------------------------------- objective / trainer
def _tiny(**kw):
  config = dino_config.get_config('tiny')
  config.batch_size = 8
  config.data.worker_count = 0
  config.async_checkpoint = False
  for k, v in kw.items():
    config[k] = v
  return config


def _batch(config, b=4, seed=0, segments=False):
  rng = np.random.default_rng(seed)
  g, l = config.data.image_size, config.data.local_size
  n = config.data.local_crops_number
  batch = {'global': rng.integers(0, 256, (b, 2, g, g, 3), np.uint8),
           'local': rng.integers(0, 256, (b, n, l, l, 3), np.uint8)}
  if segments:
    batch['segments_global'] = rng.integers(0, 4, (b, 2, g, g), np.uint8)
    batch['segments_local'] = rng.integers(0, 4, (b, n, l, l), np.uint8)
  return batch


@pytest.fixture(scope='module')
def tiny_dino():
  config = _tiny()
  obj = dino.make(config)
  batch = _batch(config)
  params, state = jax.jit(obj.init)(jax.random.key(0), batch)
  return config, obj, batch, params, state


def test_teacher_gets_no_gradient_and_ema_follows_cosine_momentum(tiny_dino):
  config, obj, batch, params, state = tiny_dino
  # The teacher starts as an exact copy of the student (DINO loads the student's state dict).
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, state['teacher'])
  grad_state = jax.jit(jax.grad(lambda s: obj.loss(params, s, batch, jax.random.key(1), 0)[0]))(
      state)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_state['teacher'])) == 0.0
  moved = jax.tree.map(lambda x: x + 1.0, params)
  new = jax.jit(obj.after_update)(moved, state, 3)  # eager: a compile per op and leaf
  base = config.dino.momentum_teacher
  m = float(ema.cosine_schedule(base, 1.0, 3, config.total_steps))
  assert base < m < 1.0
  leaf = lambda t: t['encoder']['cls_token']
  np.testing.assert_allclose(np.asarray(leaf(new['teacher'])),
                             m * np.asarray(leaf(params)) + (1 - m) * np.asarray(leaf(moved)),
                             rtol=1e-6)


def test_loss_updates_center_from_teacher_outputs(tiny_dino):
  config, obj, batch, params, state = tiny_dino
  value, (new_state, metrics) = jax.jit(
      lambda p, s: obj.loss(p, s, batch, jax.random.key(1), 0))(params, state)
  crops, _ = dino.multicrop_views(config, batch)
  teacher = jax.jit(lambda t, bs: _heads(config, t, bs, crops[:1], teacher=True))(
      state['teacher'], state['batch_stats']['teacher'])
  np.testing.assert_allclose(np.asarray(new_state['center']),
                             (1 - config.dino.center_momentum) *
                             np.asarray(teacher).mean(0, keepdims=True), rtol=1e-5, atol=1e-7)
  assert float(metrics['teacher_temp']) == pytest.approx(config.dino.warmup_teacher_temp)
  assert np.isfinite(float(value))


def _heads(config, params, batch_stats, crops, *, teacher: bool):
  """DINO head logits as main_dino.py computes them: student and teacher both in train mode
  (the tiny head's BatchNorm normalises with the statistics of all rows given), the teacher
  without drop path."""
  out, _ = batchnorm.apply(dino.DINOModel(config), params, batch_stats, crops, train=True,
                           encoder_train=not teacher)
  return out


def _crop_major_loss(config, params, state, batch):
  """The layout DINO itself uses (and mimjax did before): crops stacked crop-major, loss over
  (crop, batch, K) tensors; an independent transcription to check the batch-major path
  (BatchNorm statistics over all rows do not depend on their order)."""
  cm = lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])
  crops = [cm(normalize_images(batch['global'])), cm(normalize_images(batch['local']))]
  b, k = batch['global'].shape[0], config.dino.head.out_dim
  stats = state['batch_stats']
  s = _heads(config, params, stats['student'], crops, teacher=False).reshape(-1, b, k)
  t = jax.lax.stop_gradient(_heads(config, state['teacher'], stats['teacher'], crops[:1],
                                   teacher=True))
  t = t.reshape(2, b, k)
  log_p = jax.nn.log_softmax(s / config.dino.student_temp, axis=-1)
  q = jax.nn.softmax((t - state['center']) / config.dino.warmup_teacher_temp, axis=-1)
  ce = -jnp.einsum('ibk,vbk->iv', q, log_p) / b
  keep = jnp.arange(2)[:, None] != jnp.arange(s.shape[0])[None, :]
  return jnp.sum(jnp.where(keep, ce, 0.0)) / (2 * s.shape[0] - 2), t


def test_batch_major_layout_gives_the_crop_major_loss_grads_and_center(tiny_dino):
  config = _tiny()
  config.model.drop_path = 0.0      # drop-path masks follow the row order; compare without
  obj = dino.make(config)
  batch = _batch(config, b=3, seed=4)
  *_, params, state = tiny_dino     # drop path has no params: the same model's init
  state = {**state, 'center': 0.1 * jax.random.normal(jax.random.key(2), state['center'].shape)}
  ours_fn = lambda p: obj.loss(p, state, batch, jax.random.key(1), 0)
  (value, (new_state, _)), grads = jax.jit(jax.value_and_grad(ours_fn, has_aux=True))(params)
  ref_fn = lambda p: _crop_major_loss(config, p, state, batch)
  (ref, t), ref_grads = jax.jit(jax.value_and_grad(ref_fn, has_aux=True))(params)
  np.testing.assert_allclose(float(value), float(ref), rtol=1e-6)
  # The tiny head's BatchNorm sums over all rows: the two layouts sum in another order, so a
  # few gradient entries (of ~1e-1) differ by a few 1e-7.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads,
               ref_grads)
  np.testing.assert_allclose(np.asarray(new_state['center']),
                             0.9 * np.asarray(state['center']) + 0.1 * np.asarray(t).reshape(
                                 -1, t.shape[-1]).mean(0, keepdims=True), rtol=1e-5, atol=1e-7)


def _per_device_flops(config, objective, batch, devices):
  """XLA's cost analysis (per device program) of the trainer's own train step
  (trainer.build_step: its optimizer, state and batch shardings) on `devices` CPU devices."""
  mesh = plan.mesh_of(devices)
  example = {k: v[:1] for k, v in batch.items()}
  built = trainer.build_step(config, objective, mesh, example, 1500)
  abstract_batch = sharding.abstract_batch(example, len(next(iter(batch.values()))), mesh)
  return plan.flops(built.step_fn.lower(built.abstract, abstract_batch).compile())


def _kd_objective(config, batch):
  """The DINO KD objective (distill method=dino) with a freshly initialised MRE-DINO teacher."""
  teacher_cfg = mre_dino_config.get_config('tiny')
  example = {k: v[:1] for k, v in batch.items()}
  teacher_params, _ = dino.make(teacher_cfg).init(jax.random.key(3), example)
  dino_config.tiny_recipe(config, bn_head=False)  # the KD row's head (configs/distill.py)
  config.distill = distill.default_config()
  config.distill.method = 'dino'
  config.distill.crops = 'all'
  return distill._make_dino(config, teacher_cfg, teacher_params)


@pytest.mark.slow
@pytest.mark.parametrize('which', ['dino', 'mre_dino', 'kd'])
def test_multicrop_step_splits_over_the_data_axis(which):
  """Issue 13.1: the crop-major merge made every device run the whole global batch (tiny
  DINO: 10.19 GFLOP per device on 1 device and 10.18 on 8); per-device work must fall to 1/8.

  Slow: tests/test_scale.py checks the same 1/8 for every tiny training config (dino,
  mre_dino and the DINO KD row included) in the default set; this one compiles a 1-device
  step as well, as the regression was first measured."""
  module = mre_dino_config if which == 'mre_dino' else dino_config
  make = lambda c, b: (_kd_objective(c, b) if which == 'kd' else dino.make(c))
  batch = _batch(module.get_config('tiny'), b=64, segments=which != 'dino')
  # What the loader ships to an MRE model (and to the KD teacher): patch ids, not raw maps.
  batch = pipeline.to_patch_ids(batch, mre_dino_config.get_config('tiny').data)
  flops = []
  for devices in (1, 8):
    config = module.get_config('tiny')
    flops.append(_per_device_flops(config, make(config, batch), batch, devices))
  assert flops[1] / flops[0] == pytest.approx(1 / 8, rel=0.15), flops


def test_mre_dino_gives_every_crop_its_own_segment_ids():
  config = mre_dino_config.get_config('tiny')
  maps = _batch(config, segments=True)
  batch = pipeline.to_patch_ids(maps, config.data)  # what the loader ships: (B, crops, N) ids
  crops, ids = dino.multicrop_views(config, batch)
  assert [c.shape for c in crops] == [(8, 32, 32, 3), (8, 16, 16, 3)]
  assert [i.shape for i in ids] == [(8, 64), (8, 16)]
  # batch-major: row 3 of the stacked globals is example 1's second crop; patch (0, 0) is the
  # majority id of its 4×4 pixels.
  patch = maps['segments_global'][1, 1, :4, :4].ravel()
  assert int(ids[0][3, 0]) == int(np.bincount(patch).argmax())
  np.testing.assert_array_equal(np.asarray(crops[1][5]),
                                np.asarray(normalize_images(maps['local'][2, 1])))
  with pytest.raises(ValueError, match='segment_ids_global'):
    dino.multicrop_views(config, _batch(config))
  with pytest.raises(ValueError, match='segment_patch_size=4'):  # raw maps, not patch ids
    dino.multicrop_views(config, maps | {'segment_ids_global': maps['segments_global']})


def _segments_data(root):
  """A 24-image TFDS set with `segments` (what the SAM stage writes), 32 px."""
  rng = np.random.default_rng(0)
  def examples():
    for i in range(24):
      img = rng.integers(0, 256, (32, 32, 3), np.uint8)
      seg = np.zeros((32, 32), np.uint8)
      seg[:16, :16], seg[16:, 8:] = 1 + i % 3, 4
      yield i, {'image': tfds_io.encode_image(img), 'label': i % 2, 'segments': seg}
  return tfds_io.write_tfds(str(root), 'digits', tfds_io.features_dict(['a', 'b'],
                                                                       with_segments=True),
                            {'train': examples})


@pytest.mark.parametrize('which', [pytest.param('dino', marks=pytest.mark.slow), 'mre_dino'])
def test_tiny_config_trains_through_trainer(tmp_path, capsys, which):
  module = {'dino': dino_config, 'mre_dino': mre_dino_config}[which]
  config = module.get_config('tiny')
  config.batch_size = 8
  config.total_steps = 2
  config.log_every = 1
  config.checkpoint_every = 2
  config.async_checkpoint = False
  config.data.worker_count = 0
  if which == 'dino':
    config.evals.knn.max_train = 64   # the monitor runs at the last step; keep it small
    config.evals.knn.max_test = 32
  else:  # the SAM stage's train-only photos: the tiny row has no kNN monitor to skip
    assert not config.evals
    config.data.data_dir = _segments_data(tmp_path / 'sam')
  record = trainer.train_and_evaluate(config, str(tmp_path / 'w'))
  assert np.isfinite(record['loss']) and record['step'] == 2
  assert (tmp_path / 'w' / 'checkpoints' / '2').exists()
  if which == 'mre_dino':
    err = capsys.readouterr().err
    assert 'warning' not in err, err   # the documented command is clean
    assert not (tmp_path / 'w' / 'results.json').exists()
  with open(tmp_path / 'w' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  losses = [r['dino_loss'] for r in rows if 'dino_loss' in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  if which == 'dino':   # the kNN monitor ran at the last step and wrote W/results.json
    with open(tmp_path / 'w' / 'results.json') as f:
      assert 0 <= json.load(f)['knn/top1'] <= 100


def test_collapse_metrics_by_hand():
  rng = np.random.default_rng(5)
  b, s, k = 3, 4, 7
  student = jnp.asarray(rng.normal(size=(b, s, k)), jnp.float32)
  teacher = jnp.asarray(3 * rng.normal(size=(b, 2, k)), jnp.float32)
  center = jnp.asarray(rng.normal(size=(1, k)), jnp.float32)

  def loss_and_metrics(student, teacher, center):  # jit: eagerly each op compiles on its own
    loss = dino.dino_loss(student, teacher, center, 0.1, 0.3)
    return dino.collapse_metrics(student, teacher, center, 0.1, 0.3, loss)
  m = jax.jit(loss_and_metrics)(student, teacher, center)
  softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(
      x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
  q = softmax((np.asarray(teacher) - np.asarray(center)) / 0.3)
  p = softmax(np.asarray(student) / 0.1)
  h = lambda x: float(np.mean(-(x * np.log(x)).sum(-1)))
  kl = np.mean([np.mean((q[:, i] * (np.log(q[:, i]) - np.log(p[:, v]))).sum(-1))
                for i in range(2) for v in range(s) if v != i])
  np.testing.assert_allclose(float(m['teacher_entropy']), h(q), rtol=1e-5)
  np.testing.assert_allclose(float(m['student_entropy']), h(p), rtol=1e-5)
  np.testing.assert_allclose(float(m['teacher_student_kl']), kl, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(m['output_uniformity']), h(p) / np.log(k), rtol=1e-5)
  q_mean = q.mean(0)                                        # (T, K) batch-mean teacher
  np.testing.assert_allclose(float(m['teacher_batch_entropy']),
                             np.mean(-(q_mean * np.log(q_mean)).sum(-1)), rtol=1e-5)
  assert float(m['teacher_batch_entropy']) >= float(m['teacher_entropy'])   # concavity of H


def test_uniform_output_warns_once(capsys):
  count = 0
  for step, u in enumerate([0.5, 0.995, 0.3, 0.995, 0.999, 0.998, 'nan']):
    count = trainer._warn_uniform({'step': step, 'output_uniformity': u}, count)
  err = capsys.readouterr().err
  assert err.count('warning') == 1 and 'step 4: the student output is uniform' in err


def test_use_bn_head_state_teacher_in_train_mode_and_ema_skips_stats():
  config = _tiny()
  config.dino.head.use_bn = True
  obj = dino.make(config)
  batch = _batch(config)
  params, state = jax.jit(obj.init)(jax.random.key(0), batch)
  assert sorted(state['batch_stats']) == ['student', 'teacher']
  assert sorted(state['batch_stats']['student']['head']) == ['mlp_1', 'mlp_4']
  _, (new, _) = jax.jit(lambda p, s: obj.loss(p, s, batch, jax.random.key(1), 0))(params, state)
  # Both running means moved from 0, each by its own forward: the student's over all crops
  # (its statistics differ from the teacher's, which sees the globals only).
  st, te = (new['batch_stats'][k]['head']['mlp_1']['mean'] for k in ('student', 'teacher'))
  assert float(jnp.abs(te).max()) > 0 and float(jnp.abs(st - te).max()) > 1e-6
  # The EMA moves parameters only; the statistics are untouched by after_update.
  after = obj.after_update(params, new, 1)
  assert after['batch_stats'] is new['batch_stats']


def test_use_bn_training_matches_the_pytorch_reference_loop():
  """mimjax DINO with `dino.head.use_bn` vs the PyTorch transcription of main_dino.py (student
  and teacher in train mode, SyncBatchNorm = global batch statistics), 20 steps, same init and
  batches: loss per step and the final running statistics of both heads."""
  from tests.objectives import dino_torch_ref
  config = dino_config.get_config('tiny')
  config.dino.head.use_bn = True
  config.optim.lr = None          # DINO's rule, 5e-4 × 16/256 = 3.1e-5: the bias bound below
  config.batch_size = 16          # small and fast; 1500 // 16 = 93 steps per epoch
  config.total_steps = 100
  final = {}
  ours, theirs = dino_torch_ref.run_side_by_side(config, 20, log=None, final=final)
  np.testing.assert_allclose([r['loss'] for r in ours], [r['loss'] for r in theirs],
                             rtol=1e-4, atol=1e-4)
  stats = final['mimjax']['state']['batch_stats']
  for who in ('student', 'teacher'):
    ref = dino_torch_ref.head_batch_stats(final[who])['head']
    for name, s in stats[who]['head'].items():
      np.testing.assert_allclose(np.asarray(s['var']), ref[name]['var'], rtol=1e-5, atol=1e-6)
      # The Linear bias before a BatchNorm cancels in the output: its gradient is round-off,
      # which Adam still turns into steps of up to ~lr (3e-5 here) per step, differently in
      # each framework. Only the running mean sees that bias: allow 20 such steps.
      np.testing.assert_allclose(np.asarray(s['mean']), ref[name]['mean'], atol=20 * 3.2e-5)


# ------------------------------------------------------------------- tiny recipe: no collapse
def _train_tiny(workdir, **overrides):
  """configs/dino.py:tiny through the trainer; → (config, logged rows, results.json)."""
  config = dino_config.get_config('tiny')
  config.async_checkpoint = False
  for k, v in overrides.items():
    config[k] = v
  trainer.train_and_evaluate(config, str(workdir))
  with open(workdir / 'metrics.jsonl') as f:
    rows = [r for r in map(json.loads, f) if 'loss' in r]
  with open(workdir / 'results.json') as f:
    return config, rows, json.load(f)


def _assert_not_collapsed(config, rows):
  """Away from both collapse modes: the uniform output (loss = H(q) = ln K, student entropy
  ln K) and one prototype for every image (H(mean_b q) → 0)."""
  ln_k = np.log(config.dino.head.out_dim)
  last = rows[-1]
  # Measured for the 60-step default: mean loss 0.91·ln K, final 3.92 = 0.94·ln K, uniformity
  # 0.80, H(q) 0.40, H(mean q) 3.15. Uniform collapse: loss ≈ ln K, uniformity ≈ 1, H(q) ≈ ln K;
  # one prototype for all: H(mean q) ≈ 0.
  assert np.mean([r['loss'] for r in rows]) < 0.95 * ln_k, rows
  assert last['loss'] < 0.97 * ln_k, last
  assert last['output_uniformity'] < 0.9, last
  assert 0.05 < last['teacher_entropy'] < 0.5 * ln_k, last
  # The targets depend on the image: a batch uses more prototypes than one image does.
  assert last['teacher_batch_entropy'] > 1.0, last
  assert last['teacher_batch_entropy'] > last['teacher_entropy'] + 1.0, last


def test_tiny_recipe_does_not_collapse(tmp_path):
  """Issue 14.10: the shipped tiny recipe ends away from both collapse modes. (In-process:
  57–63 s in the suite; the documented command as a subprocess at XLA's default optimisation
  took 81 s there, its data pipeline and the other worker competing for 2 cores.)"""
  config, rows, _ = _train_tiny(tmp_path / 'w')
  assert rows[-1]['step'] == config.total_steps == 60
  _assert_not_collapsed(config, rows)


@pytest.mark.slow
def test_tiny_recipe_learns_knn_above_random_encoder(tmp_path):
  """Issue 14.10: the tiny run's kNN top-1 beats the same encoder at init (lr 0 for a step:
  the student keeps its initial params; measured 64.0 % vs 62.0 %, a small margin)."""
  config, rows, trained = _train_tiny(tmp_path / 'w')
  _assert_not_collapsed(config, rows)
  optim_cfg = config.optim.copy_and_resolve_references()
  optim_cfg.lr = 0.0
  _, _, random = _train_tiny(tmp_path / 'r', total_steps=1, optim=optim_cfg, log_every=1)
  assert trained['knn/top1'] > random['knn/top1'] + 1, (trained, random)


@pytest.mark.slow
def test_tiny_holds_for_400_steps_and_beats_the_random_encoder(tmp_path):
  """Issue 14.10: the issue's command, tiny (BN head, lr 5e-4, local crops 0.25–0.5) on a
  400-step schedule, holds the loss below ln K to the end (measured 3.35 = 0.80·ln 64, max 3.6
  over the second half) and learns (kNN measured 67.3 % vs 62.0 % for the encoder at init).
  ~6 min on 2 cores."""
  config = dino_config.get_config('tiny')
  config.async_checkpoint = False
  config.total_steps = 400
  trainer.train_and_evaluate(config, str(tmp_path / 'w'))
  with open(tmp_path / 'w' / 'metrics.jsonl') as f:
    rows = [r for r in map(json.loads, f) if 'loss' in r]
  with open(tmp_path / 'w' / 'results.json') as f:
    trained = json.load(f)
  ln_k = np.log(config.dino.head.out_dim)
  last = rows[-1]
  assert last['step'] == 400
  assert last['loss'] < 0.85 * ln_k, last
  assert max(r['loss'] for r in rows if r['step'] > 200) < 0.9 * ln_k, rows
  assert last['output_uniformity'] < 0.9, last
  assert 0.05 < last['teacher_entropy'] < 0.5 * ln_k, last
  assert last['teacher_batch_entropy'] > last['teacher_entropy'] + 1.0, last
  optim_cfg = config.optim.copy_and_resolve_references()
  optim_cfg.lr = 0.0
  _, _, random = _train_tiny(tmp_path / 'r', total_steps=1, optim=optim_cfg, log_every=1)
  assert trained['knn/top1'] > random['knn/top1'] + 2, (trained, random)
