"""Masks for masked image modeling: MAE random (noise-argsort)."""

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
