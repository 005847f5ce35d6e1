"""Probe heads: AbMILP weights, attentive pooler, BN + linear; mixup/cutmix targets."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mimjax.data import mixup
from mimjax.models import probe_heads


def test_abmilp_weights_sum_to_one_and_aggregate():
  x = jax.random.normal(jax.random.key(0), (3, 9, 8))
  module = probe_heads.AbMILP()
  params = module.init(jax.random.key(1), x)
  pooled, w = module.apply(params, x)
  np.testing.assert_allclose(np.asarray(w.sum(-1)), np.ones(3), rtol=1e-6)
  # Hand computation: softmax(x·w + b) weighted sum.
  k = params['params']['scorer']['kernel'][:, 0]
  b = params['params']['scorer']['bias'][0]
  s = np.asarray(x @ k + b)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(pooled), np.einsum('bn,bnd->bd', a, np.asarray(x)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('pool', ['cls', 'mean', 'abmilp', 'attentive'])
def test_probe_head_shapes_and_bn_without_affine(pool):
  cfg = ml_collections.ConfigDict({'pool': pool, 'num_classes': 5, 'num_heads': 2})
  x = jax.random.normal(jax.random.key(0), (4, 1 + 16, 8))
  head = probe_heads.ProbeHead(cfg, num_prefix=1)
  variables = head.init(jax.random.key(1), x)
  assert 'bn' not in variables['params']  # affine=False: no scale / bias
  assert set(variables['batch_stats']['bn']) == {'mean', 'var'}
  (logits, aux), _ = head.apply(variables, x, train=True, mutable=['batch_stats'])
  assert logits.shape == (4, 5)
  if pool in ('abmilp', 'attentive'):
    w = aux['weights']
    np.testing.assert_allclose(np.asarray(w.sum(-1)), np.ones(w.shape[:-1]), rtol=1e-5)


def test_mixup_targets_follow_timm():
  labels = jnp.array([0, 1, 2, 3])
  t = mixup.smoothed_one_hot(labels, 4, 0.1)
  np.testing.assert_allclose(np.asarray(t[0]), [0.925, 0.025, 0.025, 0.025], rtol=1e-6)
  images = jnp.arange(4.0)[:, None, None, None] * jnp.ones((4, 8, 8, 1))
  out, targets = mixup.mixup_cutmix(jax.random.key(0), images, labels, 4, mixup_alpha=0.8,
                                    cutmix_alpha=0.0, smoothing=0.0)
  lam = float(targets[0, 0])  # sample 0 mixes with sample 3
  np.testing.assert_allclose(np.asarray(out[0]), lam * 0 + (1 - lam) * 3, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(targets.sum(-1)), np.ones(4), rtol=1e-6)
  out, targets = mixup.mixup_cutmix(jax.random.key(3), images, labels, 4, mixup_alpha=0.0,
                                    cutmix_alpha=1.0, smoothing=0.0)
  # CutMix: λ = fraction of pixels kept from the sample itself.
  kept = float(jnp.mean(out[0] == 0.0))
  assert float(targets[0, 0]) == pytest.approx(kept, abs=1e-6)
