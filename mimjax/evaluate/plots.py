"""PNG figures (matplotlib, Agg): attention maps, MAE reconstructions, AAD per layer, spectra."""

import os
from typing import Any, Optional

import matplotlib

matplotlib.use('Agg')  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from mimjax.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize_images  # noqa: E402
from mimjax.models.vit import ViT, model_dims  # noqa: E402
from mimjax.objectives import pretrained  # noqa: E402


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches='tight')
  plt.close(fig)
  return path


def prefix_attention_maps(model_config: ml_collections.ConfigDict, encoder_params: Any,
                          images: np.ndarray) -> np.ndarray:
  """(B, layers, prefix, g, g): attention of each [cls]/proxy token to the patches (head mean)."""
  model = ViT(model_config)
  prefix = pretrained.num_prefix_tokens(model_config)
  _, aux = jax.jit(lambda p, x: model.apply({'params': p}, normalize_images(x),
                                            return_attention=True))(encoder_params, images)
  maps = jnp.stack([a[:, :, :prefix, prefix:].mean(1) for a in aux['attention']], axis=1)
  g = int(round(maps.shape[-1] ** 0.5))
  return np.asarray(maps).reshape(maps.shape[:3] + (g, g))


def plot_attention_maps(images: np.ndarray, maps: np.ndarray, path: str) -> str:
  """Rows = images; columns = the image, then the [cls] (first prefix token) map of every
  layer, then each extra proxy token of the last layer, overlaid on the image."""
  b, layers, prefix = maps.shape[:3]
  cols = 1 + layers + (prefix - 1)
  fig, axes = plt.subplots(b, cols, figsize=(1.6 * cols, 1.6 * b), squeeze=False)
  size = images.shape[1]
  for i in range(b):
    panels = [('image', None)] + [(f'L{l + 1} cls', maps[i, l, 0]) for l in range(layers)]
    panels += [(f'L{layers} proxy {t}', maps[i, -1, t]) for t in range(1, prefix)]
    for ax, (title, m) in zip(axes[i], panels):
      ax.imshow(images[i])
      if m is not None:
        up = np.kron(m, np.ones((size // m.shape[0], size // m.shape[1])))
        ax.imshow(up, cmap='inferno', alpha=0.6)
      ax.set_axis_off()
      if i == 0:
        ax.set_title(title, fontsize=7)
  fig.suptitle('attention of [cls]/proxy tokens to patches (mean over heads)', fontsize=9)
  return _save(fig, path)


def mae_reconstructions(pretrain_config: ml_collections.ConfigDict, params: Any,
                        images: np.ndarray, seed: int = 0) -> Optional[dict]:
  """Original / masked / reconstruction (+ visible) images of an MAE workdir, else None."""
  if pretrain_config.get('objective') != 'mae' or 'decoder' not in params:
    return None
  from mimjax import masking  # MAE-only figure
  from mimjax.objectives import mae
  model = mae.MAE(pretrain_config)
  p = model_dims(pretrain_config.model)['patch_size']
  x = normalize_images(images)
  m = masking.random_masking(jax.random.key(seed), x.shape[0], (x.shape[1] // p) ** 2,
                             pretrain_config.get('mask_ratio', 0.75))
  pred = model.apply({'params': params}, x, m.keep_ids, m.restore_ids)
  if pretrain_config.get('norm_pix', True):  # undo per-patch norm with the true patch stats
    target = mae.patchify(x, p)
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, ddof=1, keepdims=True)
    pred = pred * jnp.sqrt(var + 1e-6) + mean
  mask = m.mask[..., None]
  recon = mae.unpatchify(pred, p)
  masked = mae.unpatchify(mae.patchify(x, p) * (1 - mask), p)
  pasted = mae.unpatchify(mae.patchify(x, p) * (1 - mask) + pred * mask, p)
  to_uint8 = lambda t: np.asarray(jnp.clip(
      (t * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN)) * 255, 0, 255)).astype(np.uint8)
  return {'original': images, 'masked': to_uint8(masked), 'reconstruction': to_uint8(recon),
          'reconstruction + visible': to_uint8(pasted)}


def plot_reconstructions(panels: dict, path: str) -> str:
  """One row per image, one column per entry of `panels`."""
  names = list(panels)
  b = len(panels[names[0]])
  fig, axes = plt.subplots(b, len(names), figsize=(1.8 * len(names), 1.8 * b), squeeze=False)
  for i in range(b):
    for j, n in enumerate(names):
      axes[i, j].imshow(panels[n][i])
      axes[i, j].set_axis_off()
      if i == 0:
        axes[i, j].set_title(n, fontsize=8)
  return _save(fig, path)


def plot_aad(aad: np.ndarray, path: str, patch_size: Optional[int] = None) -> str:
  """(layers, heads) AAD: one dot per head and the head mean per layer."""
  layers, heads = aad.shape
  fig, ax = plt.subplots(figsize=(5, 3.5))
  x = np.arange(1, layers + 1)
  for h in range(heads):
    ax.scatter(x, aad[:, h], s=12, alpha=0.6, color='tab:blue', label='head' if h == 0 else None)
  ax.plot(x, aad.mean(-1), color='tab:red', marker='o', label='mean over heads')
  ax.set_xlabel('layer')
  ax.set_ylabel('average attention distance (px)')
  ax.set_xticks(x)
  if patch_size:
    ax.set_title(f'AAD per layer and head (patch {patch_size} px)', fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_spectra(log_svals: np.ndarray, path: str) -> str:
  """(layers, D) log10 singular values of the feature covariance, one curve per layer."""
  layers = log_svals.shape[0]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  colors = plt.cm.viridis(np.linspace(0, 1, layers))
  for l in range(layers):
    ax.plot(np.arange(1, log_svals.shape[1] + 1), log_svals[l], color=colors[l],
            label=f'layer {l + 1}')
  ax.set_xlabel('singular value rank')
  ax.set_ylabel('log10 singular value')
  ax.set_title('feature covariance spectrum per layer', fontsize=9)
  ax.legend(fontsize=6, ncol=2)
  ax.grid(alpha=0.3)
  return _save(fig, path)
