"""EMA update and cosine momentum vs hand computations."""

import math

import jax.numpy as jnp
import numpy as np

from mimjax.ema import cosine_schedule, ema_update


def test_ema_update_hand_computed():
  target = {'w': jnp.array([1.0, 2.0]), 'bn': {'mean': jnp.array([0.0])}}
  online = {'w': jnp.array([3.0, 0.0]), 'bn': {'mean': jnp.array([10.0])}}
  out = ema_update(target, online, 0.9)
  np.testing.assert_allclose(out['w'], [0.9 * 1 + 0.1 * 3, 0.9 * 2])
  np.testing.assert_allclose(out['bn']['mean'], [1.0])


def test_cosine_momentum_matches_dino_scheduler():
  total = 50
  ref = [1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * i / total)) for i in range(total)]
  ours = [float(cosine_schedule(0.996, 1.0, i, total)) for i in range(total)]
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  assert float(cosine_schedule(0.996, 1.0, 0, total)) == np.float32(0.996)
  # With warm-up: linear from warmup_start to base.
  np.testing.assert_allclose(float(cosine_schedule(1.0, 0.0, 5, 20, 10, 0.0)), 0.5)
