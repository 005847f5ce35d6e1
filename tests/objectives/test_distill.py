"""MRE-MAE (u = 0 ≡ MAE, gradients reach u) and the KD post-processing objective: attention
MSE and KD cross-entropy vs hand / PyTorch computations, zero distillation loss when teacher
and student attention agree, the MIM part equal to MAE's loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import distill as distill_config
from configs import mae as mae_config
from configs import mre_dino as mre_dino_config
from configs import mre_mae as mre_mae_config
from mimjax import checkpoint
from mimjax.data import pipeline
from mimjax.objectives import distill, dino, mae


def _mae_batch(b=4, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.zeros((b, 32, 32), np.uint8)
  seg[:, :16, :] = 1
  seg[:, 16:, 16:] = 2 + rng.integers(0, 3, (b, 1, 1)).astype(np.uint8)
  batch = {'image': rng.integers(0, 256, (b, 32, 32, 3), np.uint8), 'segments': seg}
  return pipeline.to_patch_ids(batch, mre_mae_config.get_config('tiny').data)


def test_mre_mae_with_zero_bias_equals_mae_and_gradients_reach_u():
  mre_cfg, mae_cfg = mre_mae_config.get_config('tiny'), mae_config.get_config('tiny')
  mre, plain = mae.make(mre_cfg), mae.make(mae_cfg)
  batch = _mae_batch()
  params, _ = jax.jit(mre.init)(jax.random.key(0), batch)
  seg = params['encoder']['segment_bias']
  assert seg['u_pos'].shape == (2, 4) and float(jnp.abs(seg['u_pos']).max()) == 0.0
  plain_params = {k: v for k, v in params.items()}
  plain_params['encoder'] = {k: v for k, v in params['encoder'].items() if k != 'segment_bias'}
  rng = jax.random.key(3)
  grad_fn = jax.jit(jax.value_and_grad(lambda p: mre.loss(p, {}, batch, rng, 0)[0]))
  value, grads = grad_fn(params)
  ref = jax.jit(lambda p: plain.loss(p, {}, batch, rng, 0)[0])(plain_params)
  assert float(value) == float(ref)   # exactly: a zero bias adds exact zeros to the logits
  g = grads['encoder']['segment_bias']
  assert float(jnp.abs(g['u_pos']).min()) > 0 and float(jnp.abs(g['u_neg']).min()) > 0


def test_attention_mse_by_hand_and_layer_selection():
  rng = np.random.default_rng(0)
  s = [jnp.asarray(rng.random((2, 3, 4, 4)), jnp.float32) for _ in range(3)]
  t = [jnp.asarray(rng.random((2, 3, 4, 4)), jnp.float32) for _ in range(3)]
  per = [np.mean((np.asarray(a) - np.asarray(b)) ** 2) for a, b in zip(s, t)]
  # the default: the last block only (MAE-Lite's distill_attn_idx = (12,), SAM-helps-SSL §3.3)
  assert distill.default_config().layers == 'last'
  np.testing.assert_allclose(float(distill.attention_mse(s, t)), per[2], rtol=1e-6)
  np.testing.assert_allclose(float(distill.attention_mse(s, t, 'all')), np.mean(per), rtol=1e-6)
  for layers in ((0, -1), '0,-1'):  # a tuple, or the string a --config.distill.layers= flag gives
    np.testing.assert_allclose(float(distill.attention_mse(s, t, layers)),
                               (per[0] + per[2]) / 2, rtol=1e-6)
  # the torch formulation of Eq. 9 on one layer
  ref = F.mse_loss(torch.from_numpy(np.asarray(s[1])), torch.from_numpy(np.asarray(t[1])))
  np.testing.assert_allclose(float(distill.attention_mse(s, t, (1,))), float(ref), rtol=1e-6)
  assert float(distill.attention_mse(s, s)) == 0.0
  with pytest.raises(ValueError, match='config.distill.layers'):
    distill.attention_mse(s, t, (3,))
  with pytest.raises(ValueError, match='config.distill.layers'):
    distill.attention_mse(s, t, 'first')


def test_kd_cross_entropy_matches_torch():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(6, 9)).astype(np.float32), rng.normal(size=(6, 9)).astype(np.float32)
  q = F.softmax(torch.from_numpy(t) / 0.07, dim=-1)
  ref = torch.sum(-q * F.log_softmax(torch.from_numpy(s) / 0.1, dim=-1), dim=-1).mean()
  np.testing.assert_allclose(float(distill.kd_cross_entropy(jnp.asarray(s), jnp.asarray(t),
                                                            0.1, 0.07)), float(ref), rtol=1e-5)


def _teacher_workdir(tmp_path, config, batch, objective):
  params, _ = jax.jit(objective.init)(jax.random.key(0), batch)
  workdir = str(tmp_path / 'teacher')
  checkpoint.save_params(workdir, config, params)
  return workdir, params


def test_mae_kd_is_mae_plus_zero_when_attention_agrees(tmp_path):
  teacher_cfg = mre_mae_config.get_config('tiny')
  batch = _mae_batch()
  workdir, teacher_params = _teacher_workdir(tmp_path, teacher_cfg, batch, mae.make(teacher_cfg))
  config = distill_config.get_config('tiny')
  config.teacher = workdir
  kd = distill.make(config)
  params, state = jax.jit(kd.init)(jax.random.key(5), batch)
  assert 'segment_bias' not in params['encoder']          # a plain ViT student
  np.testing.assert_array_equal(params['encoder']['cls_token'],
                                teacher_params['encoder']['cls_token'])   # init = teacher
  rng = jax.random.key(7)
  value, (_, metrics) = jax.jit(lambda p, s: kd.loss(p, s, batch, rng, 0))(params, state)
  # u = 0 in the teacher: its maps equal the student's, so the KD loss is the MAE loss.
  assert float(metrics['attention_mse']) == 0.0
  ref = jax.jit(lambda p: mae.make(mae_config.get_config('tiny')).loss(p, {}, batch, rng, 0)[0])(
      params)
  assert float(value) == float(metrics['mae_loss']) == float(ref)
  # A nonzero bias in the teacher makes the maps differ; the student gets a gradient from them.
  state['teacher']['encoder']['segment_bias']['u_pos'] = jnp.full((2, 4), 3.0)
  att, g = jax.jit(jax.value_and_grad(  # the MSE and its gradient: one compiled program
      lambda p: kd.loss(p, state, batch, rng, 0)[1][1]['attention_mse']))(params)
  assert float(att) > 1e-6
  assert float(jnp.abs(g['encoder']['blocks_0']['attn']['qkv']['kernel']).max()) > 0


def test_dino_kd_uses_identical_views_without_centering(tmp_path):
  teacher_cfg = mre_dino_config.get_config('tiny')
  rng = np.random.default_rng(0)
  batch = {'global': rng.integers(0, 256, (2, 2, 32, 32, 3), np.uint8),
           'local': rng.integers(0, 256, (2, 2, 16, 16, 3), np.uint8),
           'segments_global': rng.integers(0, 4, (2, 2, 32, 32), np.uint8),
           'segments_local': rng.integers(0, 4, (2, 2, 16, 16), np.uint8)}
  batch = pipeline.to_patch_ids(batch, teacher_cfg.data)
  workdir, _ = _teacher_workdir(tmp_path, teacher_cfg, batch, dino.make(teacher_cfg))
  config = distill_config.get_config('tiny,method=dino')
  config.teacher = workdir
  config.model.drop_path = 0.0    # the student trains with drop path; switch it off to compare
  kd = distill.make(config)
  params, state = jax.jit(kd.init)(jax.random.key(1), batch)
  value, _ = jax.jit(lambda p, s: kd.loss(p, s, batch, jax.random.key(2), 0))(params, state)
  # Student = teacher weights and u = 0: both give the same logits z on the 2 global crops.
  crops, _ = dino.multicrop_views(config, batch)
  z = jax.jit(lambda p, x: dino.DINOModel(config).apply({'params': p}, x))(params, crops[:1])
  expected = jax.jit(distill.kd_cross_entropy, static_argnums=(2, 3))(z, z, 0.1, 0.07)
  np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)


def test_bad_distill_config_errors(tmp_path):
  config = distill_config.get_config('tiny')
  with pytest.raises(ValueError, match='config.teacher'):
    distill.make(config)
  teacher_cfg = mae_config.get_config('tiny')
  checkpoint.write_config(str(tmp_path), teacher_cfg)
  config.teacher = str(tmp_path)
  config.distill.method = 'dino'
  with pytest.raises(ValueError, match="objective 'mae'"):
    distill.make(config)


def test_dino_kd_refuses_a_batchnorm_head(tmp_path):
  # _check_teacher runs on the teacher's config.json before any checkpoint is read.
  teacher_cfg = mre_dino_config.get_config('tiny')
  teacher_cfg.dino.head.use_bn = True
  checkpoint.write_config(str(tmp_path), teacher_cfg)
  config = distill_config.get_config('tiny,method=dino')
  config.teacher = str(tmp_path)
  with pytest.raises(ValueError, match=r'config.dino.head.use_bn'):
    distill.make(config)
