"""masks → id map: ranking, top-c, overlap painting, against hand-made maps."""

import numpy as np
import pytest

from mimjax.sam import generator


def _box(shape, r0, r1, c0, c1):
  m = np.zeros(shape, bool)
  m[r0:r1, c0:c1] = True
  return m


def test_paint_hand_example():
  shape = (4, 6)
  a = _box(shape, 0, 4, 0, 3)   # left half, score 0.5
  b = _box(shape, 1, 3, 2, 5)   # centre, overlaps a in column 2, score 0.9 → id 1
  c = _box(shape, 0, 1, 5, 6)   # top-right pixel, score 0.7 → id 2
  d = _box(shape, 3, 4, 3, 6)   # bottom strip, score 0.1 → rank 4 > c=3: dropped
  seg = generator.paint_segments(np.stack([a, b, c, d]), [0.5, 0.9, 0.7, 0.1], max_masks=3)
  expected = np.array([[3, 3, 3, 0, 0, 2],
                       [3, 3, 1, 1, 1, 0],
                       [3, 3, 1, 1, 1, 0],
                       [3, 3, 3, 0, 0, 0]], np.uint8)
  np.testing.assert_array_equal(seg, expected)
  assert seg.dtype == np.uint8


def test_empty_masks_dropped_and_ties_stable():
  shape = (2, 2)
  empty = np.zeros(shape, bool)
  full = np.ones(shape, bool)
  top = _box(shape, 0, 1, 0, 2)
  # The empty mask has the best score but covers nothing: it takes no id.
  seg = generator.paint_segments(np.stack([empty, full, top]), [1.0, 0.5, 0.5], 5)
  # Tie 0.5/0.5: the earlier mask (full) ranks first (id 1) and wins the overlap.
  np.testing.assert_array_equal(seg, np.ones(shape, np.uint8))
  assert generator.paint_segments(np.zeros((0, 2, 2), bool), [], 5).sum() == 0


@pytest.mark.parametrize('rank_by,expected_top', [('predicted_iou', 0), ('stability_score', 1),
                                                   ('area', 2)])
def test_records_rank_by(rank_by, expected_top):
  shape = (3, 3)
  masks = [_box(shape, 0, 1, 0, 1), _box(shape, 1, 2, 0, 2), _box(shape, 2, 3, 0, 3)]
  records = [{'segmentation': m, 'area': int(m.sum()), 'predicted_iou': iou,
              'stability_score': st} for m, iou, st in zip(masks, [0.9, 0.8, 0.7],
                                                           [0.90, 0.99, 0.95])]
  seg = generator.records_to_segments(records, shape, rank_by, max_masks=1)
  np.testing.assert_array_equal(seg, masks[expected_top].astype(np.uint8))
  assert generator.mask_ratio(seg) == pytest.approx(masks[expected_top].mean())


def test_bad_arguments():
  with pytest.raises(ValueError, match='rank_by'):
    generator.score_fn('confidence')
  with pytest.raises(ValueError, match='max_masks'):
    generator.paint_segments(np.ones((1, 2, 2), bool), [1.0], 0)


def test_bf16_image_encoder_agrees_with_fp32_default():
  """The default runs SAM in fp32 (as the official generator); the bf16 option changes the
  scores but, on the tiny random SAM, every mask keeps a near-identical counterpart."""
  from skimage import data, transform
  from configs import sam as sam_config
  from mimjax.sam import sources
  image = (transform.resize(data.astronaut(), (96, 96), anti_aliasing=True) * 255).astype(np.uint8)
  records = {}
  for dtype in ('float32', 'bfloat16'):
    config = sam_config.get_config('tiny')
    assert config.dtype == 'float32'
    config.dtype, config.device = dtype, 'cpu'
    records[dtype] = sources.make_sam_source(config)(image)
  fp32, bf16 = records['float32'], records['bfloat16']
  assert len(fp32) == len(bf16) > 0
  assert any(a['predicted_iou'] != b['predicted_iou'] for a, b in zip(fp32, bf16))  # bf16 ran
  masks = [r['segmentation'] for r in bf16]
  for r in fp32:
    best = max((r['segmentation'] & m).sum() / max((r['segmentation'] | m).sum(), 1)
               for m in masks)
    assert best >= 0.95
