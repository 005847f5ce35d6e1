"""Singular-value spectrum of layer-wise features (LUT §4 "spectral analysis").

Per block: features Z (n, D) = pooled block output of n test images (default: mean of patch
tokens through a parameter-free LayerNorm; `pool='cls'` for the [cls] token), centred;
covariance C = ZᵀZ / n; its singular values σ_1 ≥ σ_2 ≥ ... (C's nonzero spectrum equals
that of LUT's n×n Gram matrix). Summary: effective rank exp(H(σ/Σσ)) (Roy & Vetterli).
    config.evals.spectrum = {module: 'spectrum', num_images: 1024}
"""

from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from mimjax import sharding
from mimjax.data.normalize import normalize_images
from mimjax.evaluate import base
from mimjax.models import readout
from mimjax.models.vit import ViT
from mimjax.objectives import pretrained


def covariance_spectrum(z: np.ndarray) -> np.ndarray:
  """Singular values (descending) of the feature covariance of z (n, D)."""
  z = np.asarray(z, np.float64)
  z = z - z.mean(0, keepdims=True)
  cov = z.T @ z / z.shape[0]
  return np.linalg.svd(cov, compute_uv=False)


def effective_rank(svals: np.ndarray, eps: float = 1e-12) -> float:
  """exp of the Shannon entropy of the normalised singular values."""
  p = np.asarray(svals, np.float64)
  p = p / max(p.sum(), eps)
  p = p[p > 0]
  return float(np.exp(-(p * np.log(p)).sum()))


class Spectrum(base.Evaluator):
  """Evaluator: per-layer covariance spectra; `details['log_svals']` (layers, D) for plots."""

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
               objective: Any, mesh):
    super().__init__(name, cfg, config, objective, mesh)
    model = ViT(config.model)
    prefix = pretrained.num_prefix_tokens(config.model)
    how = cfg.get('pool', 'mean')

    def layer_features(params, images):
      _, aux = model.apply({'params': params}, normalize_images(images), return_layers=True)
      return jnp.stack([readout.pool(t, how, prefix) for t in aux['layers']], axis=1)

    self._fn = sharding.jit_on(mesh, layer_features)

  def run(self, params: Any, state: Any) -> dict:
    z, _ = pretrained.extract(self._fn, self.encoder_params(params, state), self.data_config,
                            self.mesh, self.split('split'), self.batch_size, self.seed,
                            int(self.cfg.get('num_images', 1024)))
    svals = np.stack([covariance_spectrum(z[:, i]) for i in range(z.shape[1])])
    self.details = {'svals': svals, 'log_svals': np.log10(np.maximum(svals, 1e-30))}
    out = {f'effective_rank/layer_{i + 1}': effective_rank(s) for i, s in enumerate(svals)}
    out.update({f'top_sval/layer_{i + 1}': float(s[0]) for i, s in enumerate(svals)})
    return out


def make(name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
         objective: Any, mesh) -> Spectrum:
  """`config.evals.<name>.module = 'spectrum'`."""
  return Spectrum(name, cfg, config, objective, mesh)
