"""Pixel normalisation, done on device so the host ships uint8 (4x less transfer)."""

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: jnp.ndarray, dtype=jnp.float32) -> jnp.ndarray:
  """uint8 [0, 255] (..., H, W, 3) → ImageNet mean/std normalised float (torchvision order)."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  return x.astype(dtype)
