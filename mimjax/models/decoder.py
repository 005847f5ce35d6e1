"""MAE decoder: embed visible tokens, insert mask tokens, unshuffle, blocks, predict pixels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mimjax.models.attention import xavier
from mimjax.models.vit import DTYPES, Block, sincos_pos_embed_2d


class MAEDecoder(nn.Module):
  """Official MAE decoder (names: embed, mask_token, pos_embed, blocks_i, norm, pred).

  `config` needs width, depth, num_heads, mlp_dim, and the encoder's patch_size/image_size.
  """
  config: ml_collections.ConfigDict
  patch_size: int
  image_size: int
  out_dim: int

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, restore_ids: jnp.ndarray, *, train: bool = False):
    """tokens (B, 1 + keep, D_enc) with cls first; restore_ids (B, N) → (B, N, out_dim)."""
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
    for i in range(cfg.depth):
      x, _ = Block(cfg.num_heads, cfg.mlp_dim, dtype=dtype, attention=cfg.get('attention', 'xla'),
                   name=f'blocks_{i}')(x, None, None, None, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=dtype, name='norm')(x)
    x = nn.Dense(self.out_dim, dtype=dtype, kernel_init=xavier, name='pred')(x)
    return x[:, 1:].astype(jnp.float32)
