"""SAM stage: automatic masks (PyTorch segment-anything or superpixels) → segment-id maps.

`python -m mimjax.sam --config configs/sam.py:ARG --workdir W` writes a TFDS data set with
`image`, `label`, `segments` under W (see docs/sam.md). torch and segment_anything are imported
only by the modules of this package that need them, never by the rest of mimjax.
"""
