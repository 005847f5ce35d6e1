"""Masks for masked image modeling: MAE random (noise-argsort) and BEiT block-wise."""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RandomMask(NamedTuple):
  keep_ids: jnp.ndarray     # (B, keep) int32 ids of visible patches, in shuffled order
  mask: jnp.ndarray         # (B, N) float32, 1 = removed, in original patch order
  restore_ids: jnp.ndarray  # (B, N) int32, argsort of the shuffle


def num_keep(num_patches: int, mask_ratio: float) -> int:
  """MAE: len_keep = int(L · (1 − ratio))."""
  return int(num_patches * (1 - mask_ratio))


def random_masking_from_noise(noise: jnp.ndarray, mask_ratio: float) -> RandomMask:
  """MAE per-sample masking: argsort(noise) ascending, keep the first int(N(1−r)) ids."""
  n = noise.shape[-1]
  keep = num_keep(n, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=-1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=-1).astype(jnp.int32)
  mask = jnp.concatenate([jnp.zeros(noise.shape[:-1] + (keep,)),
                          jnp.ones(noise.shape[:-1] + (n - keep,))], axis=-1)
  mask = jnp.take_along_axis(mask, ids_restore, axis=-1)
  return RandomMask(ids_shuffle[..., :keep], mask.astype(jnp.float32), ids_restore)


def random_masking(rng: jax.Array, batch_size: int, num_patches: int,
                   mask_ratio: float) -> RandomMask:
  """Draws U[0,1) noise with `rng` and masks as MAE does."""
  noise = jax.random.uniform(rng, (batch_size, num_patches))
  return random_masking_from_noise(noise, mask_ratio)


# ------------------------------------------------------------------------------ block-wise (BEiT)
# Block masking is sequential rejection sampling. It runs in JAX with bounded loops so it can sit
# inside the jitted loss next to the random masking: one key per sample (split from the step
# key), hence deterministic per key and independent of the device count.
ATTEMPTS = 10         # BEiT `_mask`: up to 10 tries to place one block
NUM_UNIFORMS = 4      # per attempt: area, log-aspect, top, left


def num_block_masked(num_patches: int, mask_ratio: float) -> int:
  """BEiT/MaskFeat: num_masking_patches = round(N · ratio) (196 · 0.4 → 78)."""
  return int(round(num_patches * mask_ratio))


def default_block_rounds(num_masked: int) -> int:
  """Outer-loop bound: each productive round adds ≥ 1 cell; 2× leaves room for failed rounds."""
  return 2 * num_masked + 10


def block_mask_from_uniforms(uniforms: jnp.ndarray, fill_noise: jnp.ndarray, grid: tuple[int, int],
                             num_masked: int, min_patches: int, max_patches=None,
                             min_aspect: float = 0.3) -> jnp.ndarray:
  """BEiT `MaskingGenerator` on one sample, driven by pre-drawn U[0,1) numbers.

  uniforms (rounds, 10, 4): round r, attempt a uses (area, log-aspect, top, left) draws:
    area ~ U(min_patches, budget), aspect = exp(U(log min_aspect, −log min_aspect)),
    h = round(√(area·aspect)), w = round(√(area/aspect)), accepted only if w < W and h < H,
    top ~ randint(0, H − h) and left ~ randint(0, W − w) inclusive (unilm `random.randint`),
    and only if 0 < newly covered cells ≤ budget. Rounds continue until `num_masked` cells are
    masked (mmpretrain; unilm stops at the first empty round). If `rounds` run out first, the
    remaining cells are the free ones with the lowest `fill_noise` (N,) — never seen in practice.
  Returns the (H·W,) float32 mask, 1 = masked, row-major.
  """
  uniforms, fill_noise = jnp.asarray(uniforms, jnp.float32), jnp.asarray(fill_noise, jnp.float32)
  gh, gw = grid
  max_patches = num_masked if max_patches is None else max_patches
  log_lo, log_hi = jnp.log(min_aspect), jnp.log(1.0 / min_aspect)
  rows = jnp.arange(gh)[:, None]
  cols = jnp.arange(gw)[None, :]
  rounds = uniforms.shape[0]

  def place_block(mask, budget, u):
    """One outer round: the first of 10 attempts that adds 1..budget cells is applied."""
    def attempt(a, carry):
      mask, delta = carry
      area = min_patches + u[a, 0] * (budget - min_patches)
      aspect = jnp.exp(log_lo + u[a, 1] * (log_hi - log_lo))
      h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
      w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
      top = jnp.floor(u[a, 2] * (gh - h + 1)).astype(jnp.int32)
      left = jnp.floor(u[a, 3] * (gw - w + 1)).astype(jnp.int32)
      box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
      new = jnp.sum(box & (mask == 0))
      ok = (delta == 0) & (w < gw) & (h < gh) & (new > 0) & (new <= budget)
      return jnp.where(ok & box, 1.0, mask), jnp.where(ok, new, delta)
    return jax.lax.fori_loop(0, uniforms.shape[1], attempt, (mask, jnp.int32(0)))

  def cond(carry):
    r, _, count = carry
    return (r < rounds) & (count < num_masked)

  def body(carry):
    r, mask, count = carry
    budget = jnp.minimum(num_masked - count, max_patches)
    mask, delta = place_block(mask, budget, uniforms[r])
    return r + 1, mask, count + delta

  _, mask, count = jax.lax.while_loop(
      cond, body, (jnp.int32(0), jnp.zeros((gh, gw), jnp.float32), jnp.int32(0)))
  mask = mask.reshape(-1)
  # Top-up (rounds exhausted): rank free cells by noise, mask the first `num_masked − count`.
  rank = jnp.argsort(jnp.argsort(jnp.where(mask > 0, jnp.inf, fill_noise)))
  return jnp.where((mask == 0) & (rank < num_masked - count), 1.0, mask)


def mask_to_ids(mask: jnp.ndarray, num_masked: int) -> RandomMask:
  """(B, N) 0/1 mask with exactly `num_masked` ones per row → RandomMask (visible ids first in
  raster order, then masked ids in raster order; restore ids undo that order)."""
  ids_shuffle = jnp.argsort(mask, axis=-1, stable=True).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=-1).astype(jnp.int32)
  keep = mask.shape[-1] - num_masked
  return RandomMask(ids_shuffle[..., :keep], mask.astype(jnp.float32), ids_restore)


def block_masking(rng: jax.Array, batch_size: int, grid: tuple[int, int], num_masked: int,
                  min_patches: int, max_patches=None, min_aspect: float = 0.3,
                  rounds=None) -> RandomMask:
  """BEiT block-wise masks for a batch; one folded key per sample, exactly `num_masked` each."""
  rounds = default_block_rounds(num_masked) if rounds is None else rounds
  n = grid[0] * grid[1]

  def one(key):
    u_key, fill_key = jax.random.split(key)
    u = jax.random.uniform(u_key, (rounds, ATTEMPTS, NUM_UNIFORMS))
    return block_mask_from_uniforms(u, jax.random.uniform(fill_key, (n,)), grid, num_masked,
                                    min_patches, max_patches, min_aspect)

  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch_size))
  return mask_to_ids(jax.vmap(one)(keys), num_masked)


def masked_ids(m: RandomMask) -> jnp.ndarray:
  """(B, N − keep) ids of the masked patches (the tail of the shuffle order)."""
  ids_shuffle = jnp.argsort(m.restore_ids, axis=-1).astype(jnp.int32)
  return ids_shuffle[..., m.keep_ids.shape[-1]:]


MASKINGS = ('random', 'block')


def num_masked(config, num_patches: int) -> int:
  """Masked patches per sample for `config.masking` / `config.mask_ratio`."""
  ratio = config.get('mask_ratio')
  if not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
    raise ValueError(f'config.mask_ratio={ratio!r}: expected a float in (0, 1)')
  kind = config.get('masking', 'random')
  if kind == 'random':
    return num_patches - num_keep(num_patches, ratio)
  if kind == 'block':
    return num_block_masked(num_patches, ratio)
  raise ValueError(f'config.masking={kind!r}: expected one of {MASKINGS}')


def make_mask(config, rng: jax.Array, batch: int, num_patches: int) -> RandomMask:
  """Masks for any MIM objective from `config.masking` ∈ {random, block}, `config.mask_ratio`
  and, for block, `config.block_mask` {min_patches (None → num_masked // 5, MaskFeat),
  max_patches (None = no cap), min_aspect (0.3)}."""
  count = num_masked(config, num_patches)
  if config.get('masking', 'random') == 'random':
    return random_masking(rng, batch, num_patches, config.mask_ratio)
  side = int(round(num_patches ** 0.5))
  if side * side != num_patches:
    raise ValueError(f'config.masking="block" needs a square patch grid, got {num_patches}')
  block = config.get('block_mask') or {}
  min_patches = block.get('min_patches')
  min_patches = max(count // 5, 1) if min_patches is None else int(min_patches)
  min_aspect = float(block.get('min_aspect', 0.3))
  if not 0 < min_aspect <= 1:
    raise ValueError(f'config.block_mask.min_aspect={min_aspect!r}: expected a float in (0, 1]')
  return block_masking(rng, batch, (side, side), count, min_patches, block.get('max_patches'),
                       min_aspect)
