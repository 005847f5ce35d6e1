"""MRE (SAM helps SSL): segment ids → additive attention-logit bias (u_pos, u_neg).

For tokens i, j with patch segment ids m_i, m_j (0 = background / no mask, and the cls token
counts as 0): b_ij = u_pos if m_i = m_j ≠ 0, u_neg if m_i ≠ m_j with both ≠ 0, else 0.
The bias enters as (q·k + b)/√d (paper Eq. 5); `Attention` applies the 1/√d.

One representation: `SegmentBias` returns `SegmentTerms` — the token ids and a (depth, heads)
row of (u_pos, u_neg) per layer; block i reads `terms.layer(i)` (or, with scanned layers, row i
as its scan input). `Attention` materialises `SegmentTerms.dense()` for the einsum and fused
paths (the (B, T, T) relation masks are the same for every layer, so XLA shares them); the
Pallas kernel takes the terms as they are and forms the bias per tile, with no T×T array.
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

# mode → shape of the learnable (u_pos, u_neg) tables given (depth, heads); 'fixed' has none.
MODES = ('layer_head', 'head', 'shared', 'fixed')
SIGNS = ('both', 'positive', 'negative')


class Relations(NamedTuple):
  positive: jnp.ndarray  # (B, T, T) bool: same nonzero segment
  negative: jnp.ndarray  # (B, T, T) bool: different nonzero segments


class SegmentTerms(NamedTuple):
  """The MRE bias in factored form: what the Pallas kernel reads instead of (B, H, T, T).

  One layer's terms have u of shape (H,); `SegmentBias` returns every layer's at once, u of
  shape (depth, H), and `layer(i)` picks layer i's.
  """
  ids: jnp.ndarray    # (B, T) int: segment id per token, 0 = unknown (cls, prefix, background)
  u_pos: jnp.ndarray  # (H,) or (depth, H) float32: same-segment pairs (0 when the sign drops it)
  u_neg: jnp.ndarray  # (H,) or (depth, H) float32: different-segment pairs

  def layer(self, i: int) -> 'SegmentTerms':
    """Layer i's terms (u of shape (H,)) out of the per-layer tables (depth, H)."""
    return SegmentTerms(self.ids, self.u_pos[i], self.u_neg[i])

  def dense(self) -> jnp.ndarray:
    """The (B, H, T, T) float32 bias, for attention paths that add a materialised bias."""
    rel = relations(self.ids)
    col = lambda u: u[None, :, None, None]
    return (rel.positive[:, None].astype(jnp.float32) * col(self.u_pos)
            + rel.negative[:, None].astype(jnp.float32) * col(self.u_neg))


def relations(ids: jnp.ndarray) -> Relations:
  """Pairwise same/different-segment masks from token ids (B, T); 0 = unknown."""
  known = ids != 0
  both = known[:, :, None] & known[:, None, :]
  same = ids[:, :, None] == ids[:, None, :]
  return Relations(both & same, both & ~same)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks config.model.segment_bias; one clear error naming the key."""
  if config.mode not in MODES:
    raise ValueError(f'config.model.segment_bias.mode={config.mode!r}: expected one of {MODES}')
  if config.sign not in SIGNS:
    raise ValueError(f'config.model.segment_bias.sign={config.sign!r}: expected one of {SIGNS}')


def default_config() -> ml_collections.ConfigDict:
  """config.model.segment_bias: off by default (plain ViT)."""
  return ml_collections.ConfigDict({
      'enabled': False,
      'mode': 'layer_head',   # per layer and head (paper's best, Tab. 5)
      'sign': 'both',         # 'positive' / 'negative': only that relation gets a bias (Tab. 4)
      'init_pos': 0.0,        # unspecified in the paper: 0 = start as plain attention
      'init_neg': 0.0,
      'fixed_value': 1.0,     # mode 'fixed': u_pos = +v, u_neg = −v (not learned)
      'num_ids': 8,           # segment ids must be < num_ids (SAM stage: 0..max_masks)
  })


class SegmentBias(nn.Module):
  """Holds u_pos/u_neg and returns every encoder layer's `SegmentTerms` for given token ids.

  The parameters exist whenever the module is called (the ViT calls it whenever
  `segment_bias.enabled`), with or without ids: the parameter tree never depends on the batch.
  """
  config: ml_collections.ConfigDict
  depth: int
  num_heads: int

  @nn.compact
  def __call__(self, token_ids: Optional[jnp.ndarray]) -> Optional[SegmentTerms]:
    """token_ids (B, T) int (cls = 0) → SegmentTerms with (depth, heads) float32 tables (row i
    = layer i; 'head'/'shared'/'fixed' repeat one row), or None without ids (plain ViT)."""
    cfg = self.config
    validate(cfg)
    if cfg.mode == 'fixed':
      u_pos = jnp.full((1, 1), cfg.fixed_value, jnp.float32)
      u_neg = -u_pos
    else:
      shape = {'layer_head': (self.depth, self.num_heads), 'head': (1, self.num_heads),
               'shared': (1, 1)}[cfg.mode]
      u_pos = self.param('u_pos', nn.initializers.constant(cfg.init_pos), shape)
      u_neg = self.param('u_neg', nn.initializers.constant(cfg.init_neg), shape)
    if token_ids is None:
      return None
    # A dropped sign gets a constant 0: same logits, and no gradient reaches its table.
    table = lambda u, on: (jnp.broadcast_to(u, (self.depth, self.num_heads)) if on
                           else jnp.zeros((self.depth, self.num_heads), jnp.float32))
    return SegmentTerms(token_ids, table(u_pos, cfg.sign in ('both', 'positive')),
                        table(u_neg, cfg.sign in ('both', 'negative')))


def checked_ids(batch: dict, key: str, image_size: int, patch_size: int) -> jnp.ndarray:
  """batch[key] (…, N) host-computed patch ids (mimjax.data.pipeline.to_patch_ids) → int32,
  with one clear error when they are missing or were computed for another patch size."""
  if key not in batch:
    raise ValueError(f'config.model.segment_bias.enabled=True but the batch has no {key!r}: '
                     'train on SAM-stage output (`python -m mimjax.sam`) with '
                     f'config.data.segment_patch_size={patch_size} (the model\'s patch size)')
  ids = batch[key]
  n = (image_size // patch_size) ** 2
  if ids.ndim < 2 or ids.shape[-1] != n:
    raise ValueError(f'batch[{key!r}] has shape {tuple(ids.shape)}, expected (…, {n}) patch '
                     f'ids for {image_size}-px crops: set config.data.segment_patch_size='
                     f'{patch_size} (the model\'s patch size)')
  return ids.astype(jnp.int32)
