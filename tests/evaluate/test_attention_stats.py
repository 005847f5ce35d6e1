"""AAD and the beyond-cls attention statistics vs hand computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from mimjax.evaluate import attention_stats as stats


def test_patch_distances_in_pixels():
  d = stats.patch_distances(2, 16)
  # patches: 0=(0,0) 1=(0,1) 2=(1,0) 3=(1,1)
  np.testing.assert_allclose(d[0], [0, 16, 16, 16 * np.sqrt(2)], rtol=1e-6)
  np.testing.assert_allclose(d, d.T)


def test_aad_of_hand_made_pattern():
  # T = 1 cls + 4 patches on a 2x2 grid of 8-px patches.
  a = np.zeros((5, 5), np.float32)
  a[0, 0] = 1.0                        # cls row is ignored
  a[1, [0, 1, 2]] = [0.5, 0.25, 0.25]  # patch 0: to cls, itself, right neighbour
  a[2, 3] = 1.0                        # patch 1 → patch 2 (diagonal, 8√2 px)
  a[3, 4] = 1.0                        # patch 2 → patch 3 (8 px)
  a[4, 4] = 1.0                        # patch 3 → itself (0 px)
  attn = jnp.asarray(a)[None, None]
  # Hand computation, no renormalisation after dropping the cls column.
  per_query = [0.25 * 8.0, 8 * np.sqrt(2), 8.0, 0.0]
  aad = stats.average_attention_distance(attn, patch_size=8)
  np.testing.assert_allclose(np.asarray(aad), [[np.mean(per_query)]], rtol=1e-6)


def test_beyond_cls_stats_by_hand():
  a = np.zeros((3, 3), np.float32)  # cls + 2 patches
  a[0] = [0.5, 0.25, 0.25]
  a[1] = [0.2, 0.6, 0.2]
  a[2] = [0.0, 0.1, 0.9]
  out = {k: float(v[0, 0]) for k, v in stats.beyond_cls_stats(jnp.asarray(a)[None, None]).items()}
  eps = 1e-6
  assert out['cls_cls'] == pytest.approx(0.5)
  assert out['cls_to_patch'] == pytest.approx(0.25)
  assert out['patch_to_cls'] == pytest.approx(0.1)
  assert out['patch_self'] == pytest.approx((0.6 + 0.9) / 2)
  assert out['patch_self_rel'] == pytest.approx((0.6 / (0.8 + eps) + 0.9 / (1.0 + eps)) / 2,
                                                rel=1e-5)

  def h(row):
    p = np.asarray(row) / (np.sum(row) + eps)
    return -np.sum(p * np.log(p + eps))

  assert out['cls_entropy'] == pytest.approx(h([0.25, 0.25]), rel=1e-5)
  assert out['cls_entropy'] == pytest.approx(np.log(2), rel=1e-4)  # uniform over 2 patches
  assert out['patch_entropy'] == pytest.approx((h([0.6, 0.2]) + h([0.1, 0.9])) / 2, rel=1e-5)


def test_prefix_tokens_are_excluded():
  # Two prefix tokens: their rows/cols must not enter the patch-patch AAD.
  attn = jnp.asarray(np.eye(6, dtype=np.float32))[None, None]  # 2 prefix + 4 patches, all self
  assert float(stats.average_attention_distance(attn, 16, num_prefix=2)[0, 0]) == 0.0
  shifted = np.zeros((6, 6), np.float32)
  shifted[:2, 0] = 1.0
  shifted[2:, 0] = 0.5
  shifted[2:, 1] = 0.5
  out = stats.beyond_cls_stats(jnp.asarray(shifted)[None, None], num_prefix=2)
  assert float(out['patch_to_cls'][0, 0]) == pytest.approx(0.5)
