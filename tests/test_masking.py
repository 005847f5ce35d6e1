"""Masking: BEiT block-wise vs a transcription of unilm/mmpretrain, counts, blocks, determinism."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy import ndimage

from mimjax import masking


class ReplayMaskingGenerator:
  """unilm beit/masking_generator.py `MaskingGenerator` with mmpretrain's loop-until-equal,
  transcribed; `random.uniform(a, b)` / `random.randint(a, b)` read a fixed U[0,1) stream
  (uniform: a + (b − a)·u; randint inclusive: a + floor(u·(b − a + 1)))."""

  def __init__(self, input_size, num_masking_patches, min_num_patches=4, max_num_patches=None,
               min_aspect=0.3, max_aspect=None):
    self.height, self.width = input_size
    self.num_masking_patches = num_masking_patches
    self.min_num_patches = min_num_patches
    self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    max_aspect = max_aspect or 1 / min_aspect
    self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
    self.blocks, self.deltas = [], []

  def _mask(self, mask, max_mask_patches, u):
    delta = 0
    for attempt in range(10):
      target_area = self.min_num_patches + u[attempt, 0] * (max_mask_patches - self.min_num_patches)
      lo, hi = self.log_aspect_ratio
      aspect_ratio = math.exp(lo + u[attempt, 1] * (hi - lo))
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < self.width and h < self.height:
        top = int(math.floor(u[attempt, 2] * (self.height - h + 1)))
        left = int(math.floor(u[attempt, 3] * (self.width - w + 1)))
        num_masked = mask[top: top + h, left: left + w].sum()
        if 0 < h * w - num_masked <= max_mask_patches:
          self.blocks.append((top, left, h, w))
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i, j] == 0:
                mask[i, j] = 1
                delta += 1
        if delta > 0:
          break
    return delta

  def __call__(self, uniforms):
    mask = np.zeros((self.height, self.width), dtype=int)
    mask_count, r = 0, 0
    while mask_count != self.num_masking_patches and r < len(uniforms):
      max_mask_patches = min(self.num_masking_patches - mask_count, self.max_num_patches)
      delta = self._mask(mask, max_mask_patches, uniforms[r])
      self.deltas.append(delta)
      mask_count += delta
      r += 1
    return mask


@pytest.mark.parametrize('grid,count,min_patches,max_patches,seed', [
    ((14, 14), 78, 15, None, 0), ((14, 14), 75, 16, None, 1), ((14, 14), 118, 23, None, 2),
    ((8, 8), 38, 7, None, 3), ((14, 14), 78, 4, 20, 4)])
def test_block_mask_matches_beit_generator(grid, count, min_patches, max_patches, seed):
  rounds = masking.default_block_rounds(count)
  fn = jax.jit(lambda u, f: masking.block_mask_from_uniforms(
      u, f, grid, count, min_patches, max_patches))
  rng = np.random.default_rng(seed)
  for _ in range(5):
    u = rng.random((rounds, masking.ATTEMPTS, masking.NUM_UNIFORMS)).astype(np.float32)
    ref_gen = ReplayMaskingGenerator(grid, count, min_patches, max_patches)
    ref = ref_gen(u.astype(np.float64))
    ours = np.asarray(fn(u, np.zeros(grid[0] * grid[1], np.float32))).reshape(grid)
    np.testing.assert_array_equal(ours, ref)
    assert ours.sum() == count
    # The mask is exactly the union of the accepted rectangles, each within the budget.
    union = np.zeros(grid, int)
    for top, left, h, w in ref_gen.blocks:
      assert 1 <= h < grid[0] and 1 <= w < grid[1]
      union[top:top + h, left:left + w] = 1
    np.testing.assert_array_equal(union, ours)
    if max_patches:  # a block may overlap earlier ones but adds at most max_patches cells
      assert 0 < max(ref_gen.deltas) <= max_patches


# Each masking call one compiled program (eager JAX compiles every primitive on its own: most
# of these tests' time); sizes and ratios are static.
_random_masking = jax.jit(masking.random_masking, static_argnums=(1, 2, 3))
_masked_ids = jax.jit(masking.masked_ids)


def test_block_masking_count_blocks_and_determinism():
  fn = jax.jit(lambda k: masking.block_masking(k, 32, (14, 14), 78, 15))
  m = fn(jax.random.key(0))
  mask = np.asarray(m.mask)
  np.testing.assert_array_equal(mask.sum(1), 78)
  np.testing.assert_array_equal(np.asarray(fn(jax.random.key(0)).mask), mask)
  assert not np.array_equal(np.asarray(fn(jax.random.key(1)).mask), mask)
  # Blocks: few 4-connected components, far fewer than uniform random masks of the same count.
  comps = [ndimage.label(x.reshape(14, 14))[1] for x in mask]
  rand = np.asarray(_random_masking(jax.random.key(0), 32, 196, 78 / 196).mask)
  rand_comps = [ndimage.label(x.reshape(14, 14))[1] for x in rand]
  assert np.mean(comps) < 5 < np.mean(rand_comps)
  # ids: visible patches (mask 0) first, then masked (mask 1), both in raster order.
  keep, masked = np.asarray(m.keep_ids), np.asarray(_masked_ids(m))
  assert keep.shape == (32, 118) and masked.shape == (32, 78)
  for b in range(3):
    np.testing.assert_array_equal(keep[b], np.flatnonzero(mask[b] == 0))
    np.testing.assert_array_equal(masked[b], np.flatnonzero(mask[b] == 1))
    order = np.concatenate([keep[b], masked[b]])
    np.testing.assert_array_equal(np.asarray(m.restore_ids[b])[order], np.arange(196))


def test_block_masking_independent_of_device_count():
  assert jax.device_count() == 8
  key = jax.random.key(3)
  fn = lambda k: masking.block_masking(k, 16, (8, 8), 26, 5).mask
  one = jax.jit(fn)(key)  # one device
  mesh = jax.make_mesh((8,), ('data',))
  eight = jax.jit(fn, out_shardings=NamedSharding(mesh, P('data')))(key)
  assert len(one.sharding.device_set) == 1 and len(eight.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(eight), np.asarray(one))


def test_top_up_when_rounds_run_out():
  # One round places one block (< count); the rest are the free cells with lowest noise.
  u = np.full((1, masking.ATTEMPTS, masking.NUM_UNIFORMS), 0.0, np.float32)
  noise = np.arange(64, dtype=np.float32)[::-1].copy()  # lowest noise = last cells
  mask = np.asarray(jax.jit(masking.block_mask_from_uniforms, static_argnums=(2, 3, 4))(
      u, noise, (8, 8), 20, 4))
  # u = 0: area 4, aspect 0.3 → h = round(√1.2) = 1, w = round(√13.3) = 4 at (0, 0).
  expected = np.zeros(64)
  expected[:4] = 1
  expected[-16:] = 1
  np.testing.assert_array_equal(mask, expected)


def _cfg(**kw):
  return ml_collections.ConfigDict(kw)


def test_make_mask_dispatch_and_errors():
  key = jax.random.key(5)
  make_mask = lambda cfg: jax.jit(lambda k: masking.make_mask(cfg, k, 4, 196))(key)
  r = make_mask(_cfg(masking='random', mask_ratio=0.6))
  ref = _random_masking(key, 4, 196, 0.6)
  np.testing.assert_array_equal(np.asarray(r.keep_ids), np.asarray(ref.keep_ids))
  assert masking.num_masked(_cfg(masking='random', mask_ratio=0.6), 196) == 118  # ⌈117.6⌉
  b = make_mask(_cfg(masking='block', mask_ratio=0.4))
  np.testing.assert_array_equal(np.asarray(b.mask).sum(1), 78)  # round(78.4), MaskFeat
  assert masking.num_masked(_cfg(masking='block', mask_ratio=75 / 196), 196) == 75
  np.testing.assert_array_equal(np.asarray(_masked_ids(r)).shape, (4, 118))
  with pytest.raises(ValueError, match='config.masking'):
    masking.make_mask(_cfg(masking='grid', mask_ratio=0.4), key, 1, 196)
  with pytest.raises(ValueError, match='config.mask_ratio'):
    masking.make_mask(_cfg(masking='block', mask_ratio=1.5), key, 1, 196)
  with pytest.raises(ValueError, match='config.block_mask.min_aspect'):
    masking.make_mask(_cfg(masking='block', mask_ratio=0.4, block_mask={'min_aspect': 2.0}),
                      key, 1, 196)
