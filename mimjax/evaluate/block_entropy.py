"""Gardener-style data-free block importance from weight entropy — an ASSUMED estimator.

Only the Gardener abstract is available ("block importance = information entropy of the
pretrained block weights"; lower entropy ⇒ more redundant). What we implement (our choice):
per block, concatenate the kernels of attn/qkv, attn/proj, mlp/fc1, mlp/fc2 (no LayerNorm,
no biases), histogram them with `bins` equal-width bins over their [min, max], and take the
Shannon entropy (nats) of the normalised histogram. As the check the abstract suggests, the
evaluator also measures a removal sensitivity per block — mean (1 − cos) between the final
pooled features of the full encoder and of the encoder with that block's residual branches
zeroed (the block becomes the identity; no fine-tuning) — and reports the Spearman rank
correlation between entropy and sensitivity.
    config.evals.gardener = {module: 'block_entropy', bins: 256, num_images: 256}
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimjax import sharding
from mimjax.data.normalize import normalize_images
from mimjax.evaluate import base
from mimjax.models import layout, readout
from mimjax.models.vit import ViT
from mimjax.objectives import pretrained

KERNELS = (('attn', 'qkv'), ('attn', 'proj'), ('mlp', 'fc1'), ('mlp', 'fc2'))
RESIDUAL_OUTPUTS = (('attn', 'proj'), ('mlp', 'fc2'))  # zeroed → the block is the identity


def block_names(encoder_params: dict) -> list[str]:
  """'blocks_0', 'blocks_1', ... in depth order."""
  names = [k for k in encoder_params if re.fullmatch(r'blocks_\d+', k)]
  return sorted(names, key=lambda k: int(k.split('_')[1]))


def histogram_entropy(values: np.ndarray, bins: int = 256) -> float:
  """Shannon entropy (nats) of an equal-width histogram over [min, max] of `values`."""
  counts, _ = np.histogram(np.asarray(values, np.float64).ravel(), bins=bins)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def block_weight_entropy(encoder_params: dict, bins: int = 256) -> np.ndarray:
  """(depth,) entropy of each block's concatenated weight matrices (see module doc)."""
  out = []
  for name in block_names(encoder_params):
    block = encoder_params[name]
    w = np.concatenate([np.asarray(block[a][b]['kernel']).ravel() for a, b in KERNELS])
    out.append(histogram_entropy(w, bins))
  return np.asarray(out)


def remove_block(encoder_params: dict, name: str) -> dict:
  """Params with block `name`'s attention and MLP outputs zeroed (x ↦ x)."""
  params = jax.tree.map(lambda x: x, encoder_params)  # new containers, shared leaves
  block = dict(params[name])
  for a, b in RESIDUAL_OUTPUTS:
    block[a] = dict(block[a])
    block[a][b] = jax.tree.map(jnp.zeros_like, block[a][b])
  params[name] = block
  return params


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation (average ranks for ties)."""
  def ranks(x):
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind='stable')
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):  # average ties
      r[x == v] = r[x == v].mean()
    return r
  ra, rb = ranks(a), ranks(b)
  if ra.std() == 0 or rb.std() == 0:
    return float('nan')
  return float(np.corrcoef(ra, rb)[0, 1])


class BlockEntropy(base.Evaluator):
  """Evaluator: per-block weight entropy, removal sensitivity, and their rank correlation."""

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
               objective: Any, mesh):
    super().__init__(name, cfg, config, objective, mesh)
    model = ViT(config.model)
    prefix = pretrained.num_prefix_tokens(config.model)
    how = cfg.get('pool', 'cls')
    if int(cfg.get('num_images', 256)) <= 0:
      self.splits = ()  # weight entropy only: reads no images

    def feats(params, images):
      tokens, _ = model.apply({'params': params}, normalize_images(images))
      z = readout.pool(tokens, how, prefix).astype(jnp.float32)
      return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

    self._fn = sharding.jit_on(mesh, feats)
    self._scanned = layout.scans(config.model)

  def run(self, params: Any, state: Any) -> dict:
    # Blocks by name (`blocks_{i}`); the model runs them in its own layout.
    enc = layout.unstack_blocks(jax.device_get(self.encoder_params(params, state)))
    entropy = block_weight_entropy(enc, int(self.cfg.get('bins', 256)))
    out = {f'entropy/layer_{i + 1}': float(e) for i, e in enumerate(entropy)}
    num = int(self.cfg.get('num_images', 256))
    if num > 0:
      get = lambda p: pretrained.extract(self._fn, layout.to_layout(p, self._scanned),
                                         self.data_config, self.mesh, self.split('split'),
                                         self.batch_size, self.seed, num)[0]
      full = get(enc)
      sens = np.asarray([float(np.mean(1.0 - np.sum(full * get(remove_block(enc, b)), -1)))
                         for b in block_names(enc)])
      out.update({f'sensitivity/layer_{i + 1}': float(s) for i, s in enumerate(sens)})
      out['spearman_entropy_sensitivity'] = spearman(entropy, sens)
      self.details['sensitivity'] = sens
    self.details['entropy'] = entropy
    return out


def make(name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
         objective: Any, mesh) -> BlockEntropy:
  """`config.evals.<name>.module = 'block_entropy'`."""
  return BlockEntropy(name, cfg, config, objective, mesh)
