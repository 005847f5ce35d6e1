"""DINO head vs a PyTorch transcription of facebookresearch/dino `DINOHead`."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from mimjax.models import heads
# dino/vision_transformer.py DINOHead, transcribed once for this test and the DINO reference loop
from tests.objectives.dino_torch_ref import DINOHead as TorchDINOHead


def _cfg(norm_last_layer):
  c = heads.default_dino_head_config()
  c.update(out_dim=40, hidden_dim=24, bottleneck_dim=8, norm_last_layer=norm_last_layer)
  return c


@pytest.mark.parametrize('norm_last_layer', [True, False])
def test_dino_head_matches_official(norm_last_layer):
  cfg = _cfg(norm_last_layer)
  x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
  head = heads.DINOHead(cfg)
  params = head.init(jax.random.key(0), jnp.asarray(x))['params']
  if not norm_last_layer:  # a trained g != 1 must scale each output unit
    params['last_layer_weight_g'] = jnp.linspace(0.5, 2.0, 40)[None]
  ref = TorchDINOHead(16, 40, False, norm_last_layer, 3, 24, 8)
  with torch.no_grad():
    for i in (0, 2, 4):
      ref.mlp[i].weight.copy_(torch.from_numpy(np.asarray(params[f'mlp_{i}']['kernel']).T))
      ref.mlp[i].bias.copy_(torch.from_numpy(np.asarray(params[f'mlp_{i}']['bias'])))
    ref.last_layer.weight_v.copy_(torch.from_numpy(np.asarray(params['last_layer_weight_v']).T))
    if not norm_last_layer:
      ref.last_layer.weight_g.copy_(torch.from_numpy(np.asarray(params['last_layer_weight_g']).T))
    expected = ref(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(head.apply({'params': params}, jnp.asarray(x))),
                             expected, rtol=1e-5, atol=1e-6)
  # g is a parameter only when it is trained (torch shape (out, 1) → ours (1, out), 2-D).
  assert ('last_layer_weight_g' in params) == (not norm_last_layer)


def test_dino_head_init_follows_dino():
  cfg = _cfg(True)
  cfg.update(hidden_dim=512, bottleneck_dim=256, out_dim=1000)
  params = heads.DINOHead(cfg).init(jax.random.key(1), jnp.zeros((1, 384)))['params']
  k = np.asarray(params['mlp_2']['kernel'])
  assert abs(k.std() - 0.02) < 0.001 and np.all(np.asarray(params['mlp_2']['bias']) == 0)
  v = np.asarray(params['last_layer_weight_v'])   # torch default Linear: U(±1/√256)
  assert v.shape == (256, 1000) and np.abs(v).max() <= 1 / 16 and np.abs(v).max() > 0.06


def test_nlayers_one_goes_straight_to_bottleneck_and_bad_value_errors():
  cfg = _cfg(True)
  cfg.nlayers = 1
  params = heads.DINOHead(cfg).init(jax.random.key(0), jnp.zeros((1, 16)))['params']
  assert params['mlp_0']['kernel'].shape == (16, 8) and 'mlp_2' not in params
  cfg.nlayers = 0
  with pytest.raises(ValueError, match='config.dino.head.nlayers'):
    heads.DINOHead(cfg).init(jax.random.key(0), jnp.zeros((1, 16)))


def test_dino_head_with_batchnorm_matches_official_in_train_and_eval_mode():
  cfg = _cfg(True)
  cfg.use_bn = True
  rng = np.random.default_rng(0)
  x = [rng.normal(size=(6, 16)).astype(np.float32) * 2 + 1 for _ in range(2)]
  head = heads.DINOHead(cfg)
  variables = head.init(jax.random.key(0), jnp.asarray(x[0]))
  params, stats = variables['params'], variables['batch_stats']
  # torch Sequential indices: Linear, BatchNorm1d, GELU, Linear, BatchNorm1d, GELU, Linear.
  assert sorted(k for k in params if k.startswith('mlp_')) == ['mlp_0', 'mlp_1', 'mlp_3',
                                                               'mlp_4', 'mlp_6']
  assert sorted(stats) == ['mlp_1', 'mlp_4']
  params = jax.tree.map(np.asarray, params)
  params['mlp_1'] = {'scale': np.linspace(0.5, 1.5, 24, dtype=np.float32),   # non-trivial affine
                     'bias': np.linspace(-0.2, 0.3, 24, dtype=np.float32)}
  ref = TorchDINOHead(16, 40, True, True, 3, 24, 8)
  assert isinstance(ref.mlp[1], torch.nn.BatchNorm1d) and isinstance(ref.mlp[4], torch.nn.BatchNorm1d)
  with torch.no_grad():
    for i in (0, 3, 6):
      ref.mlp[i].weight.copy_(torch.from_numpy(params[f'mlp_{i}']['kernel'].T))
      ref.mlp[i].bias.copy_(torch.from_numpy(params[f'mlp_{i}']['bias']))
    for i in (1, 4):
      ref.mlp[i].weight.copy_(torch.from_numpy(params[f'mlp_{i}']['scale']))
      ref.mlp[i].bias.copy_(torch.from_numpy(params[f'mlp_{i}']['bias']))
    ref.last_layer.weight_v.copy_(torch.from_numpy(params['last_layer_weight_v'].T))
  ref.train()
  for xi in x:   # two train-mode calls: batch statistics, running stats move twice
    with torch.no_grad():
      expected = ref(torch.from_numpy(xi)).numpy()
    out, new = head.apply({'params': params, 'batch_stats': stats}, jnp.asarray(xi), train=True,
                          mutable=['batch_stats'])
    stats = new['batch_stats']
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)
  for i in (1, 4):   # torch keeps the unbiased batch variance in running_var
    np.testing.assert_allclose(np.asarray(stats[f'mlp_{i}']['mean']),
                               ref.mlp[i].running_mean.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(stats[f'mlp_{i}']['var']),
                               ref.mlp[i].running_var.numpy(), rtol=1e-5, atol=1e-7)
  ref.eval()
  with torch.no_grad():
    expected = ref(torch.from_numpy(x[0])).numpy()
  out = head.apply({'params': params, 'batch_stats': stats}, jnp.asarray(x[0]), train=False)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_dino_head_without_batchnorm_keeps_its_names_and_has_no_batch_stats():
  variables = heads.DINOHead(_cfg(True)).init(jax.random.key(0), jnp.zeros((2, 16)))
  assert sorted(k for k in variables['params'] if k.startswith('mlp_')) == ['mlp_0', 'mlp_2',
                                                                            'mlp_4']
  assert 'batch_stats' not in variables
