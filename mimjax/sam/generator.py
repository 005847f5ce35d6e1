"""Masks → segment-id map: rank by a confidence score, keep the top c, paint overlaps.

SAM-helps-SSL (Eq. 4): M ∈ {0..c}^{h×w}, 0 = no mask; where masks overlap only the most
confident one is kept. Mask k of the ranking gets id k + 1 (1 = most confident), and masks are
painted least confident first so the more confident mask wins every overlapping pixel.
"""

from typing import Callable, Sequence

import numpy as np

RANK_BY = ('predicted_iou', 'stability_score', 'area')


def paint_segments(masks: np.ndarray, scores: Sequence[float], max_masks: int) -> np.ndarray:
  """(K, H, W) bool masks + K scores → (H, W) uint8 ids: 1..c by descending score, 0 = none.

  Empty masks are dropped before ranking (they would take an id but cover nothing). Ties keep
  the input order (stable sort), so the earlier mask counts as the more confident one.
  """
  if not 1 <= max_masks <= 255:
    raise ValueError(f'max_masks must be in 1..255 (uint8 ids), got {max_masks}')
  masks = np.asarray(masks, bool)
  scores = np.asarray(scores, np.float64)
  if masks.ndim != 3 or scores.shape != (masks.shape[0],):
    raise ValueError(f'expected masks (K, H, W) and scores (K,), got {masks.shape} and '
                     f'{scores.shape}')
  out = np.zeros(masks.shape[1:], np.uint8)
  nonempty = np.flatnonzero(masks.any(axis=(1, 2)))
  order = nonempty[np.argsort(-scores[nonempty], kind='stable')][:max_masks]
  for rank in range(len(order) - 1, -1, -1):  # least confident first: later paints win
    out[masks[order[rank]]] = rank + 1
  return out


def score_fn(rank_by: str) -> Callable[[dict], float]:
  """The sort key of an AMG record ({'segmentation', 'area', 'predicted_iou', ...})."""
  if rank_by not in RANK_BY:
    raise ValueError(f'rank_by must be one of {RANK_BY}, got {rank_by!r}')
  return lambda record: float(record[rank_by])


def records_to_segments(records: Sequence[dict], shape: tuple[int, int], rank_by: str,
                        max_masks: int) -> np.ndarray:
  """AMG-style records (binary `segmentation` + scores) → (H, W) uint8 id map."""
  key = score_fn(rank_by)
  if not records:
    return np.zeros(shape, np.uint8)
  masks = np.stack([np.asarray(r['segmentation'], bool) for r in records])
  if masks.shape[1:] != tuple(shape):
    raise ValueError(f'mask shape {masks.shape[1:]} != image shape {tuple(shape)}')
  return paint_segments(masks, [key(r) for r in records], max_masks)


def mask_ratio(segments: np.ndarray) -> float:
  """Fraction of pixels covered by some mask (id ≠ 0): the paper's 'average mask ratio'."""
  return float(np.mean(np.asarray(segments) != 0)) if np.size(segments) else 0.0
