"""Data: TFDS builders, grain pipeline, augmentations."""
