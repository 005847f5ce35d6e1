"""TFDS builders: embedded default sets, image folders, ImageNet (manual download)."""
