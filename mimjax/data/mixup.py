"""timm `Mixup` (mode 'batch') on device: Mixup / CutMix with label smoothing → soft targets."""

import jax
import jax.numpy as jnp


def smoothed_one_hot(labels: jnp.ndarray, num_classes: int, smoothing: float) -> jnp.ndarray:
  """timm `one_hot(.., on=1 − s + s/C, off=s/C)`."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box_mask(rng: jax.Array, height: int, width: int, lam: jnp.ndarray):
  """timm `rand_bbox`: box of side ratio √(1−λ) centred uniformly (clipped); returns the
  (H, W) 0/1 box mask and the area-corrected λ = 1 − box area / image area."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).astype(jnp.float32)
  return box, 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def mixup_cutmix(rng: jax.Array, images: jnp.ndarray, labels: jnp.ndarray, num_classes: int, *,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.1):
  """One λ per batch; partner = the batch reversed (timm `x.flip(0)`). Returns (images (B,H,W,C),
  soft targets (B, classes)). With both alphas 0 it is label smoothing only."""
  targets = smoothed_one_hot(labels, num_classes, smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  apply = jax.random.uniform(k_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
  lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
  box, lam_box = cutmix_box_mask(k_box, images.shape[1], images.shape[2], lam_cut)
  partner = images[::-1]
  mixed = jnp.where(use_cutmix,
                    images * (1 - box[None, :, :, None]) + partner * box[None, :, :, None],
                    lam_mix * images + (1 - lam_mix) * partner)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0)
  images = jnp.where(apply, mixed, images)
  return images, lam * targets + (1 - lam) * targets[::-1]
