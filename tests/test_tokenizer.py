"""k-means codebook fit at scale: Lloyd steps vs numpy, seeding, and how the step compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mimjax import sharding
from mimjax import tokenizer
from tests import hlo

ROWS = P(sharding.BATCH_AXES)


@pytest.mark.parametrize('devices,chunk', [(1, 1000), (8, 16)])
def test_lloyd_steps_match_numpy_and_never_raise_the_objective(devices, chunk):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(301, 5)).astype(np.float32)
  centres = x[:7].copy()
  mesh = hlo.mesh_of(devices)
  chunk = sharding.row_chunk(len(x), mesh, chunk)
  xs = sharding.shard_rows(x, mesh, chunk)
  weights = sharding.shard_rows(np.ones(len(x), np.float32), mesh, chunk)
  step = tokenizer.lloyd_step(mesh)
  previous = np.inf
  for _ in range(5):
    dist = ((x[:, None].astype(np.float64) - centres[None]) ** 2).sum(-1)
    ids = dist.argmin(1)
    want = np.stack([x[ids == c].mean(0) if (ids == c).any() else centres[c]
                     for c in range(len(centres))])
    new, objective = step(xs, weights, jnp.asarray(centres))
    ours = tokenizer.nearest(jnp.asarray(x), jnp.asarray(centres))
    np.testing.assert_array_equal(np.asarray(ours), ids)
    np.testing.assert_allclose(float(objective), dist.min(1).sum(), rtol=1e-5)
    np.testing.assert_allclose(new, want, rtol=1e-5, atol=1e-6)
    assert float(objective) <= previous * (1 + 1e-6)
    previous, centres = float(objective), np.asarray(new)


def test_kmeans_plus_plus_seeds_one_centre_per_separated_cluster():
  rng = np.random.default_rng(1)
  blobs = np.asarray([[0, 0], [50, 0], [0, 50], [50, 50]], np.float32)
  x = (blobs.repeat(30, 0) + rng.normal(size=(120, 2))).astype(np.float32)
  seeds = np.asarray(tokenizer.kmeans_plus_plus(jnp.asarray(x), 4, jax.random.key(0)))
  assert all(any(np.all(np.isclose(s, x), 1)) for s in seeds)  # rows of x
  assert sorted(np.linalg.norm(seeds[:, None] - blobs, axis=-1).argmin(1)) == [0, 1, 2, 3]


def _compile_step(devices, n, dim=108, vocab=256):
  mesh = hlo.mesh_of(devices)
  return tokenizer.lloyd_step(mesh).lower(
      hlo.abstract((devices, n // devices, dim), jnp.float32, mesh, ROWS),
      hlo.abstract((devices, n // devices), jnp.float32, mesh, ROWS),
      hlo.abstract((vocab, dim), jnp.float32, mesh))


def test_lloyd_step_takes_its_data_as_an_argument_and_splits_it_over_8_devices():
  small, big = (len(_compile_step(8, n).as_text()) for n in (4096, 65536))
  assert abs(big - small) < 0.05 * small and big < 100_000  # no 28 MB constant
  one, eight = (_compile_step(d, 8192).compile() for d in (1, 8))
  assert hlo.flops(eight) == pytest.approx(hlo.flops(one) / 8, rel=0.15)
  # Only the (vocab, d) sums are reduced; no row-shaped array is gathered.
  assert all(size < 8192 // 8 for size in hlo.all_gather_sizes(eight))
