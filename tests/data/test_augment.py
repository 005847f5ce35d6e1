"""Augmentations keep segment maps aligned; RRC sampler; patch majority ids."""

import numpy as np
import pytest

from mimjax.data import augment

COLORS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)


def _scene(h=96, w=128):
  """Id map of 4 large blocks on background + the image painting each id its colour."""
  seg = np.zeros((h, w), np.uint8)
  seg[8:48, 8:60] = 1
  seg[8:48, 68:120] = 2
  seg[52:90, 8:60] = 3
  seg[52:90, 68:120] = 4
  return COLORS[seg], seg


def _interior(seg):
  """Pixels whose 7×7 neighbourhood has a single id (beyond the bicubic kernel's reach)."""
  p = np.pad(seg.astype(int), 3, constant_values=-1)  # image borders are edges too
  same = np.ones(seg.shape, bool)
  for dy in range(7):
    for dx in range(7):
      same &= p[dy:dy + seg.shape[0], dx:dx + seg.shape[1]] == seg
  return same


def _assert_aligned(img, seg, photometric=False):
  assert img.shape[:-1] == seg.shape and img.dtype == np.uint8 and seg.dtype == np.uint8
  assert set(np.unique(seg)) <= {0, 1, 2, 3, 4}  # nearest: no invented ids
  inside = _interior(seg)
  assert inside.mean() > 0.2
  if not photometric:
    err = np.abs(img[inside].astype(int) - COLORS[seg[inside]].astype(int)).max()
    assert err <= 2
  else:
    # colours change, but pixels of one id stay one colour and different ids stay apart
    for i in np.unique(seg[inside]):
      vals = img[inside & (seg == i)].astype(int)
      assert np.abs(vals - np.median(vals, 0)).max(axis=1).mean() < 12


GEOMETRIC = {
    'mae': lambda r, x, s: augment.mae_view(r, x, s, 64),
    'simple': lambda r, x, s: augment.simple_resized_crop(r, x, s, 64),
    'eval': lambda r, x, s: augment.eval_view(x, s, 64),
    'none': lambda r, x, s: augment.resize_view(x, s, 64),
    'rrc_small': lambda r, x, s: augment.random_resized_crop(r, x, s, 48, (0.05, 0.3)),
}


@pytest.mark.parametrize('name', sorted(GEOMETRIC))
def test_geometric_keeps_alignment(name):
  img, seg = _scene()
  for k in range(6):
    out, oseg = GEOMETRIC[name](np.random.default_rng(k), img, seg)
    assert out.shape == (oseg.shape + (3,))
    _assert_aligned(out, oseg)


def test_flip_is_joint():
  img, seg = _scene()
  fi, fs = augment.hflip(img, seg)
  np.testing.assert_array_equal(fs, seg[:, ::-1])
  _assert_aligned(fi, fs)


def test_lut_views_aligned():
  img, seg = _scene()
  for k in range(6):
    views, segs = augment.lut_views(np.random.default_rng(k), img, seg, 64)
    assert views.shape == (2, 64, 64, 3) and segs.shape == (2, 64, 64)
    _assert_aligned(views[0], segs[0])               # view 1: geometry only
    assert set(np.unique(segs[1])) <= {0, 1, 2, 3, 4}


def test_dino_views_aligned_and_shapes():
  img, seg = _scene()
  out = augment.dino_views(np.random.default_rng(0), img, seg, 64, 24, 4)
  assert out['global'].shape == (2, 64, 64, 3) and out['local'].shape == (4, 24, 24, 3)
  assert out['segments_global'].shape == (2, 64, 64)
  assert out['segments_local'].shape == (4, 24, 24)
  no_photo = augment.dino_views(np.random.default_rng(0), img, seg, 64, 24, 4)
  np.testing.assert_array_equal(no_photo['segments_global'], out['segments_global'])
  # geometry of a DINO crop = the RRC + flip drawn first from the same generator
  rng = np.random.default_rng(0)
  g, s = augment.random_resized_crop(rng, img, seg, 64, (0.4, 1.0))
  g, s = augment.random_hflip(rng, g, s)
  np.testing.assert_array_equal(s, out['segments_global'][0])


def test_photometric_never_touches_segments():
  img, seg = _scene()
  rng = np.random.default_rng(0)
  for _ in range(5):
    x = augment.color_jitter(rng, img)
    assert x.shape == img.shape and x.dtype == np.uint8
    _assert_aligned(x, seg, photometric=True)
  np.testing.assert_array_equal(augment.solarize(np.array([[[127, 128, 255]]], np.uint8)),
                                [[[127, 127, 0]]])
  g = augment.grayscale(img)
  assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()


def test_rrc_params_bounds_and_fallback():
  rng = np.random.default_rng(0)
  h, w = 300, 400
  for _ in range(500):
    top, left, ch, cw = augment.rrc_params(rng, h, w, (0.2, 1.0), (3 / 4, 4 / 3))
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    area = ch * cw / (h * w)
    assert 0.2 * 0.97 <= area <= 1.0
    assert 3 / 4 * 0.95 <= cw / ch <= 4 / 3 * 1.05
  # impossible scale → torchvision's centre-crop fallback at the max allowed aspect
  assert augment.rrc_params(rng, 100, 1000, (0.99, 1.0)) == (0, 433, 100, 133)
  assert augment.rrc_params(rng, 50, 50, (2.0, 3.0)) == (0, 0, 50, 50)


def test_rrc_output_shape():
  img, seg = _scene()
  out, s = augment.random_resized_crop(np.random.default_rng(1), img, seg, 40)
  assert out.shape == (40, 40, 3) and s.shape == (40, 40)
  out, s = augment.random_resized_crop(np.random.default_rng(1), img, None, 40)
  assert s is None


def test_resize_shorter_and_center_crop_match_torchvision_sizes():
  img = np.zeros((300, 451, 3), np.uint8)
  r, _ = augment.resize_shorter(img, None, 256)
  assert r.shape == (256, 384, 3)  # int(256 * 451 / 300)
  c, _ = augment.center_crop(r, None, 224)
  assert c.shape == (224, 224, 3)


def test_patch_segment_ids_majority_and_ties():
  seg = np.array([
      [1, 1, 2, 2],
      [1, 2, 2, 2],
      [0, 0, 3, 4],
      [3, 3, 4, 3],
  ], np.uint8)
  np.testing.assert_array_equal(augment.patch_segment_ids(seg, 2), [[1, 2], [0, 3]])
  # ties → lower id, background counts like any other id
  seg = np.array([[0, 5], [5, 0]], np.uint8)
  assert augment.patch_segment_ids(seg, 2).tolist() == [[0]]
  batch = np.stack([seg, np.full((2, 2), 7, np.uint8)])
  assert augment.patch_segment_ids(batch, 2).tolist() == [[[0]], [[7]]]
  assert augment.patch_segment_ids(batch, 1).shape == (2, 2, 2)
  with pytest.raises(ValueError, match='multiple of patch_size'):
    augment.patch_segment_ids(np.zeros((5, 4), np.uint8), 2)
