"""Flax ↔ PyTorch checkpoint conversion (timm ViT, official MAE); CLI: `python -m mimjax.convert`."""
