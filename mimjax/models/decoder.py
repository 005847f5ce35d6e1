"""MAE decoder: embed visible tokens, insert mask tokens, unshuffle, blocks, predict pixels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mimjax.models.attention import xavier
from mimjax.models.vit import DTYPES, block_factory, block_stack, sincos_pos_embed_2d


class MAEDecoder(nn.Module):
  """Official MAE decoder (names: embed, mask_token, pos_embed, blocks_i, norm, pred).

  `config` needs width, depth, num_heads, mlp_dim, and the encoder's patch_size/image_size;
  with `scan_layers` the blocks are one scanned `blocks` stack (mimjax.models.layout).
  """
  config: ml_collections.ConfigDict
  patch_size: int
  image_size: int
  out_dim: int

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, restore_ids: jnp.ndarray, *, train: bool = False):
    """tokens (B, 1 + keep, D_enc) with cls first; restore_ids (B, N) → (B, N, out_dim).
    `train` changes nothing: MAE's decoder has no dropout or drop path."""
    cfg = self.config
    dtype = DTYPES[cfg.get('dtype', 'float32')]
    grid = self.image_size // self.patch_size
    num_patches = grid * grid
    x = nn.Dense(cfg.width, dtype=dtype, kernel_init=xavier, name='embed')(tokens)
    mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, cfg.width))
    b, t, _ = x.shape
    fill = jnp.broadcast_to(mask_token.astype(dtype), (b, num_patches + 1 - t, cfg.width))
    patches = jnp.concatenate([x[:, 1:], fill], axis=1)
    patches = jnp.take_along_axis(patches, restore_ids[..., None], axis=1)  # unshuffle
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    init = lambda *_: jnp.asarray(sincos_pos_embed_2d(cfg.width, grid, True))[None]
    pos = jax.lax.stop_gradient(self.param('pos_embed', init))  # frozen, as in MAE
    x = x + pos.astype(dtype)
    x, _ = block_stack(x, None, lambda block, x, _: block(x), depth=cfg.depth,
                       make_block=block_factory(cfg, num_heads=cfg.num_heads,
                                                mlp_dim=cfg.mlp_dim),
                       scan=cfg.get('scan_layers', False))
    x = nn.LayerNorm(epsilon=1e-6, dtype=dtype, name='norm')(x)
    x = nn.Dense(self.out_dim, dtype=dtype, kernel_init=xavier, name='pred')(x)
    return x[:, 1:].astype(jnp.float32)
