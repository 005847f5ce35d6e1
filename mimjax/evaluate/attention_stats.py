"""Attention statistics per layer and head: average attention distance (AAD) and the
beyond-cls metrics ([cls]-[cls] attention, [cls]/patch entropy to patches, patch self-attention).

A = post-softmax attention (B, H, T, T), rows = queries, the first `num_prefix` tokens are
[cls]/proxy tokens (for several prefix tokens the "[cls]" row is the first one).
    config.evals.attn = {module: 'attention_stats', num_images: 512}
"""

from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from mimjax import sharding
from mimjax.data.normalize import normalize_images
from mimjax.evaluate import base
from mimjax.models.vit import ViT, model_dims
from mimjax.objectives import pretrained

EPS = 1e-6  # beyond-cls main_attention_stats.py


def patch_distances(grid: int, patch_size: int) -> np.ndarray:
  """(N, N) pixel distances p·‖(r_i, c_i) − (r_j, c_j)‖ between patches (row-major grid)."""
  r, c = np.divmod(np.arange(grid * grid), grid)
  coords = np.stack([r, c], -1).astype(np.float64)
  return (patch_size * np.linalg.norm(coords[:, None] - coords[None], axis=-1)).astype(np.float32)


def average_attention_distance(attn: jnp.ndarray, patch_size: int,
                               num_prefix: int = 1) -> jnp.ndarray:
  """(B, H) AAD: patch×patch block of A (prefix rows/cols dropped, no renormalisation);
  mean over patch queries i of Σ_j A_ij·D_ij in pixels."""
  a = attn[:, :, num_prefix:, num_prefix:].astype(jnp.float32)
  grid = int(round(a.shape[-1] ** 0.5))
  dist = jnp.asarray(patch_distances(grid, patch_size))
  return jnp.einsum('bhij,ij->bhi', a, dist).mean(-1)


def entropy_to_patches(attn: jnp.ndarray, num_prefix: int = 1) -> jnp.ndarray:
  """(B, H, T) entropy of each query's attention to the patches, renormalised:
  a′_j = A_ij / (Σ_{j'} A_ij' + 1e-6); H_i = −Σ_j a′_j log(a′_j + 1e-6) (natural log)."""
  a = attn[..., num_prefix:].astype(jnp.float32)
  a = a / (a.sum(-1, keepdims=True) + EPS)
  return -(a * jnp.log(a + EPS)).sum(-1)


def beyond_cls_stats(attn: jnp.ndarray, num_prefix: int = 1) -> dict:
  """Per image and head (B, H): cls_cls = A[0,0]; cls_to_patch = mean_j A[0,j];
  patch_to_cls = mean_i A[i,0]; patch_self = mean_i A[i,i]; patch_self_rel = mean_i
  A[i,i]/(Σ_j A[i,j] + 1e-6); cls_entropy = H_0; patch_entropy = mean_i H_i (i, j patches)."""
  a = attn.astype(jnp.float32)
  s = num_prefix
  patches = a[:, :, s:, s:]
  diag = jnp.diagonal(patches, axis1=-2, axis2=-1)
  ent = entropy_to_patches(a, s)
  return {
      'cls_cls': a[:, :, 0, 0],
      'cls_to_patch': a[:, :, 0, s:].mean(-1),
      'patch_to_cls': a[:, :, s:, 0].mean(-1),
      'patch_self': diag.mean(-1),
      'patch_self_rel': (diag / (patches.sum(-1) + EPS)).mean(-1),
      'cls_entropy': ent[:, :, 0],
      'patch_entropy': ent[:, :, s:].mean(-1),
  }


METRICS = ('aad',) + tuple(beyond_cls_stats(jnp.full((1, 1, 5, 5), 0.2)))


class AttentionStats(base.Evaluator):
  """Evaluator: every metric above averaged over `num_images` test images, per layer × head.

  `run` returns per-layer means over heads ('aad/layer_1', ...; 'aad/mean' over layers);
  `details` keeps the full (layers, heads) arrays for JSON output and plots.
  """

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
               objective: Any, mesh):
    super().__init__(name, cfg, config, objective, mesh)
    model = ViT(config.model)
    patch = model_dims(config.model)['patch_size']
    prefix = pretrained.num_prefix_tokens(config.model)

    def stats(params, images):
      _, aux = model.apply({'params': params}, normalize_images(images), return_attention=True)
      per_layer = []
      for attn in aux['attention']:
        m = beyond_cls_stats(attn, prefix)
        m['aad'] = average_attention_distance(attn, patch, prefix)
        per_layer.append(m)
      # (B, layers, heads) per metric
      return {k: jnp.stack([m[k] for m in per_layer], axis=1) for k in METRICS}

    self._fn = sharding.jit_on(mesh, stats)

  def run(self, params: Any, state: Any) -> dict:
    values, _ = pretrained.extract(self._fn, self.encoder_params(params, state), self.data_config,
                                 self.mesh, self.split('split'), self.batch_size,
                                 self.seed, int(self.cfg.get('num_images', 512)))
    self.details = {k: v.mean(0) for k, v in values.items()}  # (layers, heads)
    out = {}
    for k, v in self.details.items():
      for i, layer_mean in enumerate(v.mean(-1)):
        out[f'{k}/layer_{i + 1}'] = float(layer_mean)
      out[f'{k}/mean'] = float(v.mean())
    return out


def make(name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
         objective: Any, mesh) -> AttentionStats:
  """`config.evals.<name>.module = 'attention_stats'`."""
  return AttentionStats(name, cfg, config, objective, mesh)
