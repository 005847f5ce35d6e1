"""Projector/predictor MLP vs a PyTorch reference built from naver-ai/lut `_build_mlp`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

from mimjax.models import batchnorm
from mimjax.models import projector as projector_lib


def _config(**kw):
  cfg = projector_lib.default_config()
  cfg.mlp_dim = 16
  cfg.update(kw)
  return cfg


def torch_mlp(in_dim, mlp_dim, out_dim):
  """LUT `_build_mlp(2, in, mlp, out, BatchNorm1d, ReLU)`: Linear → BN → ReLU → Linear."""
  return torch.nn.Sequential(torch.nn.Linear(in_dim, mlp_dim, bias=False),
                             torch.nn.BatchNorm1d(mlp_dim), torch.nn.ReLU(),
                             torch.nn.Linear(mlp_dim, out_dim, bias=False))


def _copy_to_torch(params, ref):
  with torch.no_grad():
    ref[0].weight.copy_(torch.from_numpy(np.array(params['fc0']['kernel']).T))
    ref[1].weight.copy_(torch.from_numpy(np.array(params['bn0']['scale'])))
    ref[1].bias.copy_(torch.from_numpy(np.array(params['bn0']['bias'])))
    ref[3].weight.copy_(torch.from_numpy(np.array(params['fc1']['kernel']).T))


def test_structure_and_init():
  module = projector_lib.ProjectionMLP(_config(out_dim=8))
  params, stats = batchnorm.init(module, jax.random.key(0), jnp.zeros((2, 12)))
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes == {'fc0': {'kernel': (12, 16)}, 'bn0': {'scale': (16,), 'bias': (16,)},
                    'fc1': {'kernel': (16, 8)}}  # bias-free Linears, no BN on the output
  np.testing.assert_array_equal(stats['bn0']['mean'], np.zeros(16))
  np.testing.assert_array_equal(stats['bn0']['var'], np.ones(16))
  # xavier-uniform bound √(6/(fan_in+fan_out)) as MAE/LUT `_init_weights`.
  assert np.abs(params['fc0']['kernel']).max() <= np.sqrt(6 / 28)
  # out_dim None → input width; depth 0 → identity without parameters.
  p, _ = batchnorm.init(projector_lib.ProjectionMLP(_config()), jax.random.key(0),
                        jnp.zeros((2, 12)))
  assert p['fc1']['kernel'].shape == (16, 12)
  ident = projector_lib.ProjectionMLP(_config(depth=0))
  x = jnp.arange(6.0).reshape(2, 3)
  p, s = batchnorm.init(ident, jax.random.key(0), x)
  assert p == {} and s == {}
  np.testing.assert_array_equal(batchnorm.apply(ident, p, s, x, train=True)[0], x)


def test_matches_torch_train_and_eval_mode():
  module = projector_lib.ProjectionMLP(_config(out_dim=8))
  x = np.random.default_rng(0).normal(size=(10, 12)).astype(np.float32)
  params, stats = batchnorm.init(module, jax.random.key(1), jnp.asarray(x))
  ref = torch_mlp(12, 16, 8)
  _copy_to_torch(params, ref)

  ref.train()
  want = ref(torch.from_numpy(x)).detach().numpy()
  got, new_stats = batchnorm.apply(module, params, stats, jnp.asarray(x), train=True)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new_stats['bn0']['mean'], ref[1].running_mean.numpy(),
                             rtol=1e-5, atol=1e-6)
  # torch's running_var takes the unbiased batch variance, Flax the biased one:
  # ours = 0.9·1 + 0.1·var_unbiased·(N−1)/N with N = 10.
  var_unbiased = (ref[1].running_var.numpy() - 0.9) / 0.1
  np.testing.assert_allclose(new_stats['bn0']['var'], 0.9 + 0.1 * var_unbiased * 9 / 10,
                             rtol=1e-5, atol=1e-6)

  # Eval mode normalises with the running statistics.
  with torch.no_grad():
    ref[1].running_var.copy_(torch.from_numpy(np.array(new_stats['bn0']['var'])))
  ref.eval()
  want = ref(torch.from_numpy(x)).detach().numpy()
  got, same = batchnorm.apply(module, params, new_stats, jnp.asarray(x), train=False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert same is new_stats


def test_batch_statistics_span_the_global_sharded_batch():
  """Under jit with the batch sharded over 8 devices, BN uses the whole batch (SyncBN)."""
  assert jax.device_count() == 8
  cfg = _config(depth=2, mlp_dim=4, out_dim=4)
  module = projector_lib.ProjectionMLP(cfg)
  # Each device's 2 rows have their own offset, so per-device stats would differ.
  x = (np.random.default_rng(2).normal(size=(16, 4)) + np.repeat(np.arange(8), 2)[:, None] * 3
       ).astype(np.float32)
  _, stats = batchnorm.init(module, jax.random.key(3), jnp.asarray(x))
  params = {  # identity Linears: the output is ReLU(BN(x)), checkable by hand
      'fc0': {'kernel': jnp.eye(4)}, 'bn0': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)},
            'fc1': {'kernel': jnp.eye(4)}}
  mesh = jax.make_mesh((8,), ('data',))
  xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P('data')))
  fn = jax.jit(lambda p, s, v: batchnorm.apply(module, p, s, v, train=True))
  out, new_stats = fn(params, stats, xs)
  assert len(xs.sharding.device_set) == 8
  hand = np.maximum((x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), 0)  # global-batch BN → ReLU
  np.testing.assert_allclose(out, hand, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new_stats['bn0']['mean'], 0.1 * x.mean(0), rtol=1e-5, atol=1e-6)
  per_device = np.concatenate([np.maximum((c - c.mean(0)) / np.sqrt(c.var(0) + 1e-5), 0)
                               for c in np.split(x, 8)])
  assert not np.allclose(out, per_device, atol=1e-2)


@pytest.mark.parametrize('key,value,message', [
    ('norm', 'layer', 'config.lut.projector.norm'),
    ('act', 'tanh', 'config.lut.projector.act'),
    ('depth', -1, 'config.lut.projector.depth'),
    ('bn_momentum', 1.5, 'config.lut.projector.bn_momentum'),
])
def test_bad_config_names_the_key(key, value, message):
  cfg = _config(**{key: value})
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    projector_lib.validate_config(cfg, 'config.lut.projector')
