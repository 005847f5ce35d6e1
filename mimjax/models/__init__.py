"""Flax models: ViT encoder (+ MRE bias, proxy blocks), attention, decoder, heads."""
