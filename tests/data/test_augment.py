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


def _device_patch_ids(segments, p, num_ids):
  """What the jitted loss computed before the ids moved to the host: a one-hot over
  (B, N, p², num_ids), summed, argmax (first maximum)."""
  import jax
  import jax.numpy as jnp
  b, h, w = segments.shape
  x = jnp.asarray(segments).reshape(b, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4)
  counts = jax.nn.one_hot(x.reshape(b, -1, p * p).astype(jnp.int32), num_ids,
                          dtype=jnp.int32).sum(axis=2)
  return np.asarray(jnp.argmax(counts, axis=-1))


@pytest.mark.parametrize('high,num_ids', [(3, 8), (8, 8), (12, 8), (256, 256)])
def test_host_patch_ids_equal_the_former_device_computation(high, num_ids):
  rng = np.random.default_rng(high)
  # few ids on 2×2 patches → many ties; ids ≥ num_ids (high 12) must not vote.
  seg = rng.integers(0, high, (6, 8, 12), dtype=np.int64).astype(np.uint8)
  for p in (2, 4):
    host = augment.patch_segment_ids(seg, p, num_ids).reshape(6, -1)
    np.testing.assert_array_equal(host, _device_patch_ids(seg, p, num_ids))


def test_patch_ids_over_several_count_chunks():
  """The bincount counts ≤ 2**22 (patch, id) pairs at a time: 2·144·128 one-pixel patches with
  256 ids take two chunks; every patch's id is its pixel (ids ≥ num_ids give 0)."""
  seg = np.random.default_rng(0).integers(0, 256, (2, 144, 128), dtype=np.int64).astype(np.uint8)
  np.testing.assert_array_equal(augment.patch_segment_ids(seg, 1), seg)
  np.testing.assert_array_equal(augment.patch_segment_ids(seg, 1, 100),
                                np.where(seg < 100, seg, 0))


# ------------------------------------------------------------------------- RandAugment (timm)
def _timm_rand_augment():
  """The RandAugment that timm's create_transform builds for MAE fine-tuning (reference)."""
  from timm.data import auto_augment, create_transform
  t = create_transform(224, is_training=True, auto_augment='rand-m9-mstd0.5-inc1',
                       interpolation='bicubic', re_prob=0.25, re_mode='pixel', re_count=1)
  (ra,) = [x for x in t.transforms if isinstance(x, auto_augment.RandAugment)]
  return ra


def _photo():
  import skimage.data
  return np.ascontiguousarray(skimage.data.chelsea()[50:178, 100:260])  # 128×160, non-square


def test_randaug_settings_match_timm_create_transform():
  from mimjax.data import normalize
  ra = _timm_rand_augment()
  assert tuple(op.name for op in ra.ops) == augment.RAND_INCREASING_OPS
  assert ra.num_layers == 2 and ra.choice_weights is None
  for op in ra.ops:
    assert (op.prob, op.magnitude, op.magnitude_std) == (0.5, 9, 0.5)
    assert op.kwargs == {'fillcolor': augment.RANDAUG_FILL, 'resample': augment.BICUBIC}
  assert augment.RANDAUG_FILL == tuple(round(255 * m) for m in normalize.IMAGENET_MEAN)


@pytest.mark.parametrize('magnitude', [0.0, 3.7, 9.0, 9.61, 10.0])
def test_randaug_ops_equal_timm_ops(monkeypatch, magnitude):
  """Every op, both signs: pixel-identical to timm's AugmentOp at a fixed magnitude."""
  import copy
  from PIL import Image
  from timm.data import auto_augment
  img = _photo()
  for op in _timm_rand_augment().ops:
    for negate in (False, True):
      monkeypatch.setattr(auto_augment, '_randomly_negate', (lambda v: -v) if negate
                          else (lambda v: v))
      ref_op = copy.copy(op)
      ref_op.prob, ref_op.magnitude, ref_op.magnitude_std = 1.0, magnitude, 0
      ours, seg = augment.randaug_op(img, None, op.name, magnitude, negate)
      assert seg is None and ours.dtype == np.uint8 and ours.shape == img.shape
      if op.name == 'PosterizeIncreasing' and magnitude == 10.0:
        # 0 bits kept: timm's call is rejected by this Pillow; older Pillow gave black
        assert not ours.any()
        continue
      ref = np.asarray(ref_op(Image.fromarray(img)))
      np.testing.assert_array_equal(ours, ref, err_msg=f'{op.name} m={magnitude} {negate}')


def test_randaug_op_args_hand_values():
  a = augment.randaug_op_args
  assert a('Rotate', 9.0, True) == (-27.0,)
  assert a('PosterizeIncreasing', 9.0) == (1,) and a('PosterizeIncreasing', 4.9) == (3,)
  assert a('SolarizeIncreasing', 9.0) == (256 - 230,)
  assert a('SolarizeAdd', 9.0) == (99,)
  assert a('ContrastIncreasing', 9.0, True) == (pytest.approx(0.19),)
  assert a('ShearX', 10.0) == (pytest.approx(0.3),)
  assert a('TranslateYRel', 5.0, True) == (pytest.approx(-0.225),)
  assert a('Equalize', 9.0) == ()
  with pytest.raises(ValueError, match='unknown RandAugment op'):
    a('Cutout', 9.0)


def test_randaug_geometric_ops_move_segments_photometric_do_not():
  img, seg = _scene()
  for name in augment.RAND_INCREASING_OPS:
    for negate in (False, True):
      out, oseg = augment.randaug_op(img, seg, name, 9.0, negate)
      if name not in augment.GEOMETRIC_OPS:
        assert oseg is seg
        continue
      assert oseg.shape == seg.shape and set(np.unique(oseg)) <= {0, 1, 2, 3, 4}
      assert (oseg != seg).mean() > 0.02  # it really moved
      inside = _interior(oseg) & (oseg > 0)  # background now also holds the grey fill
      assert inside.mean() > 0.15
      err = np.abs(out[inside].astype(int) - COLORS[oseg[inside]].astype(int)).max()
      assert err <= 2, (name, negate, err)


def _clipped_normal_moments(mu, sd, hi):
  """Mean of min(X, hi) for X ~ N(mu, sd) and P(X >= hi) (closed form)."""
  import math
  z = (hi - mu) / sd
  cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
  pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
  return mu * cdf - sd * pdf + hi * (1 - cdf), 1 - cdf


def test_rand_augment_plan_distribution():
  rng = np.random.default_rng(0)
  steps = [s for _ in range(6000) for s in augment.rand_augment_plan(rng)]
  names = np.array([augment.RAND_INCREASING_OPS.index(s.name) for s in steps])
  counts = np.bincount(names, minlength=15)
  expected = len(steps) / 15
  assert ((counts - expected) ** 2 / expected).sum() < 36.12  # χ²(14) at p = 0.001
  applied = np.array([s.apply for s in steps])
  assert abs(applied.mean() - 0.5) < 0.015
  mags = np.array([s.magnitude for s in steps])
  assert mags.min() >= 0 and mags.max() == 10.0
  mean, p_clip = _clipped_normal_moments(9.0, 0.5, 10.0)
  assert abs(mags.mean() - mean) < 0.01
  assert abs((mags == 10.0).mean() - p_clip) < 0.004
  assert abs(np.mean([s.negate for s in steps]) - 0.5) < 0.015
  # ops are drawn with replacement: both layers pick the same op 1/15 of the time
  pairs = names.reshape(-1, 2)
  assert abs((pairs[:, 0] == pairs[:, 1]).mean() - 1 / 15) < 0.01
  fixed = augment.rand_augment_plan(np.random.default_rng(0), 3, 7.0, 0.0)
  assert len(fixed) == 3 and all(s.magnitude == 7.0 for s in fixed)
  uniform = [s.magnitude for _ in range(2000)
             for s in augment.rand_augment_plan(rng, magnitude=9.0, magnitude_std=1000.0)]
  assert abs(np.mean(uniform) - 4.5) < 0.15 and max(uniform) <= 9.0


def test_rand_augment_fired_ops_match_timm(monkeypatch):
  """timm's own RandAugment (ops replaced by recorders) vs ours: how many ops fire per image
  and the Rotate angle magnitudes (mean of min(N(9, .5), 10) · 3)."""
  import random
  ra = _timm_rand_augment()
  fired = []

  def recorder(name):
    def record(img, *args, **kwargs):
      del kwargs
      fired.append((name, args))
      return img
    return record

  for op in ra.ops:
    monkeypatch.setattr(op, 'aug_fn', recorder(op.name))
  random.seed(0)
  np.random.seed(0)
  timm_counts = []
  for _ in range(3000):
    before = len(fired)
    ra(None)
    timm_counts.append(len(fired) - before)
  rng = np.random.default_rng(1)
  ours = [augment.rand_augment_plan(rng) for _ in range(3000)]
  our_counts = [sum(s.apply for s in plan) for plan in ours]
  timm_hist = np.bincount(timm_counts, minlength=3) / 3000
  our_hist = np.bincount(our_counts, minlength=3) / 3000
  np.testing.assert_allclose(our_hist, timm_hist, atol=0.03)
  np.testing.assert_allclose(timm_hist, [0.25, 0.5, 0.25], atol=0.03)
  timm_rot = np.array([abs(a[0]) for n, a in fired if n == 'Rotate'])
  our_rot = np.array([abs(augment.randaug_op_args('Rotate', s.magnitude, s.negate)[0])
                      for plan in ours for s in plan if s.apply and s.name == 'Rotate'])
  assert len(timm_rot) > 150 and len(our_rot) > 150
  assert abs(timm_rot.mean() - our_rot.mean()) < 0.3
  assert abs(our_rot.mean() - 3 * _clipped_normal_moments(9.0, 0.5, 10.0)[0]) < 0.3


def test_rand_augment_deterministic_and_applies_plan():
  img = _photo()
  a, _ = augment.rand_augment(np.random.default_rng(5), img, None)
  b, _ = augment.rand_augment(np.random.default_rng(5), img, None)
  np.testing.assert_array_equal(a, b)
  for seed in range(8):
    plan = augment.rand_augment_plan(np.random.default_rng(seed))
    want = img
    for s in plan:
      if s.apply:
        want, _ = augment.randaug_op(want, None, s.name, s.magnitude, s.negate)
    got, _ = augment.rand_augment(np.random.default_rng(seed), img, None)
    np.testing.assert_array_equal(got, want)


def test_finetune_view_is_rrc_flip_then_randaugment():
  img, seg = _scene()
  for seed in range(4):
    # no RandAugment layers → exactly the MAE crop + flip with the same draws
    ft = augment.finetune_view(np.random.default_rng(seed), img, seg, 48, (0.08, 1.0),
                               num_ops=0)
    mae = augment.mae_view(np.random.default_rng(seed), img, seg, 48, (0.08, 1.0))
    np.testing.assert_array_equal(ft[0], mae[0])
    np.testing.assert_array_equal(ft[1], mae[1])
    out, oseg = augment.finetune_view(np.random.default_rng(seed), img, seg, 48)
    assert out.shape == (48, 48, 3) and oseg.shape == (48, 48) and out.dtype == np.uint8


def test_finetune_loader_deterministic_and_validated(embedded_dir):
  from mimjax.data import pipeline
  cfg = pipeline.default_data_config()
  cfg.update(data_dir=embedded_dir, augment='finetune', crop_scale=(0.35, 1.0))
  a = [next(pipeline.make_loader(cfg, global_batch_size=16, seed=3)) for _ in range(2)]
  assert a[0]['image'].shape == (16, 32, 32, 3) and a[0]['image'].dtype == np.uint8
  np.testing.assert_array_equal(a[0]['image'], a[1]['image'])
  mae = cfg.copy_and_resolve_references()
  mae.augment = 'mae'
  b = next(pipeline.make_loader(mae, global_batch_size=16, seed=3))
  np.testing.assert_array_equal(a[0]['label'], b['label'])  # same records, other pixels
  assert (a[0]['image'] != b['image']).any()
  for key, value, match in (('randaug_magnitude', 11.0, r'data.randaug_magnitude .*\[0, 10\]'),
                            ('randaug_num_ops', -1, 'data.randaug_num_ops'),
                            ('randaug_mstd', -0.5, 'data.randaug_mstd')):
    bad = cfg.copy_and_resolve_references()
    bad[key] = value
    with pytest.raises(ValueError, match=match):
      pipeline.validate_data_config(bad)
