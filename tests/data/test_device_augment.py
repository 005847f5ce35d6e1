"""The on-device photometric augmentations: torchvision numerics, DINO's draws, sharding."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P
from torchvision.transforms.v2 import functional as F

from configs import dino as dino_config
from configs import lut as lut_config
from configs import mre_dino as mre_dino_config
from mimjax.data import augment as aug_lib
from mimjax.data import device_augment as da
from mimjax.data import pipeline
from tests import hlo


def _images(n=6, h=20, w=24, seed=0):
  """uint8 (n, h, w, 3): smooth gradients plus noise (natural-ish), a flat image, a gray one,
  one with equal channels in places (hue/saturation ties) and a saturated one."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
  out = np.clip(base[None] + rng.normal(0, 30, (n, h, w, 3)), 0, 255).astype(np.uint8)
  out[1] = 77
  out[2] = out[2, ..., :1]
  out[3, :, : w // 2, 1] = out[3, :, : w // 2, 0]
  out[4] = np.where(out[4] > 128, 255, 0)
  return out


def _torch(images, fn):
  """fn applied by torchvision to each (H, W, 3) uint8 image → (n, H, W, 3) uint8."""
  t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
  return np.stack([fn(t[i], i).permute(1, 2, 0).numpy() for i in range(len(images))])


def _assert_close(ours, ref, levels):
  diff = np.abs(np.asarray(ours, np.float32) - np.asarray(ref, np.float32))
  assert diff.max() <= levels, (diff.max(), np.argwhere(diff > levels)[:5])


OPS = [  # (ours, torchvision, factors, tolerance in uint8 levels)
    (da.adjust_brightness, F.adjust_brightness, [0.6, 1.4, 1.0, 0.83, 1.21, 0.6], 1),
    (da.adjust_contrast, F.adjust_contrast, [0.6, 1.4, 1.0, 0.77, 1.33, 1.1], 1),
    (da.adjust_saturation, F.adjust_saturation, [0.8, 1.2, 1.0, 0.91, 1.13, 0.8], 1),
    (da.adjust_hue, F.adjust_hue, [-0.1, 0.1, 0.0, 0.037, -0.061, 0.09], 2),
    (da.gaussian_blur, lambda x, s: F.gaussian_blur(x, [da.BLUR_KERNEL_SIZE] * 2, [s, s]),
     [0.1, 2.0, 1.0, 0.43, 1.57, 0.77], 1),
]


@pytest.mark.parametrize('ours,theirs,factors,levels', OPS,
                         ids=['brightness', 'contrast', 'saturation', 'hue', 'blur'])
def test_each_op_equals_torchvision_v2(ours, theirs, factors, levels):
  images = _images()
  factors = np.asarray(factors, np.float32)
  out = jax.jit(ours)(jnp.asarray(images, jnp.float32), factors)
  _assert_close(out, _torch(images, lambda t, i: theirs(t, float(factors[i]))), levels)


def test_grayscale_and_solarize_equal_torchvision_v2():
  images = _images()
  x = jnp.asarray(images, jnp.float32)
  _assert_close(da.rgb_to_grayscale(x), _torch(images, lambda t, i: F.rgb_to_grayscale(t, 3)), 0)
  _assert_close(da.solarize(x), _torch(images, lambda t, i: F.solarize(t, 128)), 0)


def _torch_pipeline(t, p, i):
  """torchvision's DINO photometric chain for image i with the drawn parameters `p`."""
  get = lambda f: np.asarray(f).reshape(-1)[i]
  if get(p.jitter):
    ops = [lambda x: F.adjust_brightness(x, float(get(p.brightness))),
           lambda x: F.adjust_contrast(x, float(get(p.contrast))),
           lambda x: F.adjust_saturation(x, float(get(p.saturation))),
           lambda x: F.adjust_hue(x, float(get(p.hue)))]
    for k in np.asarray(p.order).reshape(-1, 4)[i]:
      t = ops[k](t)
  if get(p.gray):
    t = F.rgb_to_grayscale(t, 3)
  if get(p.blur):
    t = F.gaussian_blur(t, [da.BLUR_KERNEL_SIZE] * 2, [float(get(p.sigma))] * 2)
  if get(p.solarize):
    t = F.solarize(t, 128)
  return t


def test_whole_chain_with_drawn_parameters_equals_torchvision():
  """apply() with DINO draws for 2 × 8 crops vs torchvision's ops in the same order: within
  one level per op of the chain (each op within one level, hue two; rounding may compound)."""
  images = _images(16, seed=1).reshape(8, 2, 20, 24, 3)
  p = da.sample_params(jax.random.key(3), (8, 2), blur_p=0.5, solarize_p=0.3, gray_p=0.3)
  ours = np.asarray(jax.jit(da.apply)(images, p)).reshape(16, 20, 24, 3)
  assert np.asarray(p.jitter).any() and not np.asarray(p.jitter).all()
  _assert_close(ours, _torch(images.reshape(16, 20, 24, 3),
                             lambda t, i: _torch_pipeline(t, p, i)), 4)


# ---------------------------------------------------------------------------------- the draws
N = 20000  # per crop: a probability's binomial std is ≤ 0.0036; 5σ bounds below


def _rate(x, axis=0):
  return np.asarray(x, np.float64).mean(axis=axis)


def test_dino_draws_follow_data_augmentation_dino():
  g, l = da.dino_params(jax.random.key(0), N, 3)
  bound = 5 * np.sqrt(0.25 / N)
  np.testing.assert_allclose(_rate(g.blur), [1.0, 0.1], atol=bound)
  np.testing.assert_allclose(_rate(g.solarize), [0.0, 0.2], atol=bound)
  np.testing.assert_allclose(_rate(l.blur), [0.5] * 3, atol=bound)
  assert not np.asarray(l.solarize).any()
  for p in (g, l):
    np.testing.assert_allclose(_rate(p.jitter), 0.8, atol=bound)
    np.testing.assert_allclose(_rate(p.gray), 0.2, atol=bound)
    for name, (lo, hi) in {'brightness': (0.6, 1.4), 'contrast': (0.6, 1.4),
                           'saturation': (0.8, 1.2), 'hue': (-0.1, 0.1),
                           'sigma': (0.1, 2.0)}.items():
      x = np.asarray(getattr(p, name), np.float64)
      assert lo <= x.min() and x.max() <= hi, name
      # uniform: mean and variance of U(lo, hi), and both ends reached
      n = x.size
      np.testing.assert_allclose(x.mean(), (lo + hi) / 2, atol=5 * (hi - lo) / np.sqrt(12 * n))
      np.testing.assert_allclose(x.var(), (hi - lo) ** 2 / 12, rtol=0.03)
      assert x.min() < lo + 0.01 * (hi - lo) and x.max() > hi - 0.01 * (hi - lo), name
    # every one of the 24 orders, each with probability 1/24
    orders = np.asarray(p.order).reshape(-1, 4)
    assert (np.sort(orders, axis=1) == np.arange(4)).all()
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in map(tuple, orders):
      counts[row] += 1
    freq = np.array(list(counts.values())) / len(orders)
    np.testing.assert_allclose(freq, 1 / 24, atol=5 * np.sqrt((1 / 24) / len(orders)))
  # draws are independent across crops and fields: e.g. global crops 1 and 2 of an example
  corr = np.corrcoef(np.asarray(g.brightness[:, 0]), np.asarray(g.brightness[:, 1]))[0, 1]
  assert abs(corr) < 5 / np.sqrt(N)


def test_lut_draws_exactly_one_of_gray_solarize_blur():
  p = da.lut_params(jax.random.key(1), 3 * N)
  flags = np.stack([np.asarray(p.gray), np.asarray(p.solarize), np.asarray(p.blur)], 1)
  assert (flags.sum(1) == 1).all()
  np.testing.assert_allclose(_rate(flags), [1 / 3] * 3, atol=5 * np.sqrt(0.25 / (3 * N)))
  np.testing.assert_allclose(_rate(p.jitter), 0.8, atol=5 * np.sqrt(0.25 / (3 * N)))


def _dino_batch(b=16, n=2, g=16, l=8, seed=0):
  rng = np.random.default_rng(seed)
  return {'global': rng.integers(0, 256, (b, 2, g, g, 3), np.uint8),
          'local': rng.integers(0, 256, (b, n, l, l, 3), np.uint8),
          'label': np.arange(b, dtype=np.int32)}


def test_dino_and_lut_batches_keep_shapes_and_change_pixels():
  batch = _dino_batch()
  out = jax.jit(da.dino)(batch, jax.random.key(0))
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
      k: (v.shape, v.dtype) for k, v in batch.items()}
  assert (np.asarray(out['global']) != batch['global']).mean() > 0.5  # crop 1 always blurs
  np.testing.assert_array_equal(out['label'], batch['label'])
  images = batch['global']
  lut_out = jax.jit(da.lut)({'image': images}, jax.random.key(0))['image']
  np.testing.assert_array_equal(lut_out[:, 0], images[:, 0])   # view 1: crops + flips only
  assert (np.asarray(lut_out[:, 1]) != images[:, 1]).mean() > 0.3


def test_one_and_eight_devices_give_the_same_batch_and_never_gather_it():
  """Each device augments its own rows (no batch-shaped all-gather); the draws do not depend
  on the layout (jax_threefry_partitionable), so the batches agree: exactly, but for a rare
  one-level step where the two programs round a float differently next to a truncation point
  (measured with the suite's XLA flags: 4 of 24,576 values; none at XLA's default level)."""
  batch = _dino_batch(b=16)
  key = jax.random.key(7)
  mesh = hlo.mesh_of(8)
  rows = NamedSharding(mesh, P('data'))
  params = lambda b, k: da.dino_params(k, b['global'].shape[0], b['local'].shape[1])
  for fn in (da.dino, params):
    compiled = jax.jit(fn, in_shardings=(rows, None), out_shardings=rows).lower(
        batch, key).compile()
    assert [s for s in hlo.all_gather_sizes(compiled) if s >= 16] == []
    eight = jax.device_get(compiled(jax.device_put(batch, rows), key))
    one = jax.device_get(jax.jit(fn)(batch, key))
    for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one)):
      if fn is params:
        np.testing.assert_array_equal(a, b)
      else:
        diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


# ------------------------------------------------------------------------ the host side / config
def test_host_only_crops_and_flips_when_the_device_augments(embedded_dir):
  """augment_on='device': the loader's views are exact crops+flips of the record (no colour
  change); 'host' keeps the PIL path; a bad value is one clear error."""
  cfg = dino_config.get_config('tiny').data
  cfg.data_dir, cfg.worker_count = embedded_dir, 0
  assert da.for_config(cfg) is da.dino
  rng = np.random.default_rng(0)
  # RRC of a constant-colour image is that colour: with no photometric op it stays so.
  flat = np.full((32, 32, 3), (10, 200, 90), np.uint8)
  views = aug_lib.dino_views(rng, flat, None, 32, 16, 2, photometric=False)
  assert (views['global'] == (10, 200, 90)).all() and (views['local'] == (10, 200, 90)).all()
  lut_views, _ = aug_lib.lut_views(rng, flat, None, 16, photometric=False)
  assert (lut_views == (10, 200, 90)).all()
  a = pipeline.make_loader(cfg, global_batch_size=4, seed=0)
  cfg.augment_on = 'host'
  assert da.for_config(cfg) is None
  b = pipeline.make_loader(cfg, global_batch_size=4, seed=0)
  batch_a, batch_b = next(a), next(b)
  assert batch_a['global'].shape == batch_b['global'].shape
  assert (batch_a['global'] != batch_b['global']).any()
  cfg.augment_on = 'gpu'
  with pytest.raises(ValueError, match=r"data.augment_on must be one of \('device', 'host'\)"):
    pipeline.validate_data_config(cfg)


def test_recipes_with_photometric_ops_are_the_device_ones():
  assert set(da.RECIPES) == set(pipeline.DEVICE_PHOTOMETRIC)
  assert da.for_config(lut_config.get_config('tiny').data) is da.lut
  mae = dino_config.get_config('tiny').data
  mae.augment = 'mae'
  assert da.for_config(mae) is None


# ------------------------------------------------------------------- crops on the device (crop_on)
def _photo(h=120, w=160):
  import skimage.data
  from PIL import Image
  return np.asarray(Image.fromarray(skimage.data.chelsea()).resize((w, h), Image.BICUBIC))


def _crop_config(augment='dino'):
  cfg = dino_config.get_config('tiny').data
  cfg.update(augment=augment, image_size=48, local_size=24, crop_on='device',
             canvas_size=(128, 160))
  return cfg


@pytest.mark.parametrize('augment', ['dino', 'mae'])
def test_device_crops_equal_pil_crops_of_the_same_draws(augment):
  """crop_on='device': the host draws the same boxes and flips as the PIL path (same RNG
  order), the device cuts them bicubic + antialias. 3 px away from the border (where the
  kernel reads past the box edge and PIL's, cropping first, does not) they are within PIL's
  crop-then-resize by a mean ≤ 0.25 levels, 99 % within 1 level, none beyond 6."""
  cfg = _crop_config(augment)
  image = _photo()
  host = pipeline.augment_example(_host(cfg), np.random.default_rng(5), image, None, augment)
  plan = pipeline.augment_example(cfg, np.random.default_rng(5), image, None, augment)
  assert plan['canvas'].shape == (120, 160, 3)  # fits: collate pads it onto the canvas
  batch = pipeline.collate([dict(plan, label=0)], cfg)
  assert batch['canvas'].shape == (1, 128, 160, 3)
  views = jax.device_get(jax.jit(lambda b: da.crop_views(b, cfg))(batch))
  for key, want in host.items():
    got = views[key][0].astype(np.float32)
    diff = np.abs(got - want.astype(np.float32))
    inner = diff[..., 3:-3, 3:-3, :]
    assert inner.mean() <= 0.25 and np.percentile(inner, 99) <= 1 and inner.max() <= 6, (
        key, inner.mean(), inner.max())


def _host(cfg):
  host = cfg.copy_and_resolve_references()
  host.crop_on = 'host'
  return host


def test_device_crop_plumbing_and_errors():
  cfg = _crop_config()
  example = pipeline.blank_example(cfg, segments=False)
  assert set(example) == {'canvas', 'boxes_global', 'flips_global', 'boxes_local',
                          'flips_local', 'label'}
  assert example['boxes_global'].dtype == np.int32 and example['flips_local'].dtype == bool
  seen = da.objective_example(cfg, example)   # what objective init gets
  assert seen['global'].shape == (1, 2, 48, 48, 3) and seen['local'].shape == (1, 2, 24, 24, 3)
  assert 'canvas' not in seen and da.objective_example(_host(cfg), example) is example
  cfg.segment_patch_size = 8  # MRE: the device cuts the map and computes its patch ids
  example = pipeline.blank_example(cfg, segments=True)
  assert example['canvas_segments'].shape == (1, 128, 160)
  seen = da.objective_example(cfg, example)
  assert seen['segment_ids_global'].shape == (1, 2, 36)
  assert seen['segment_ids_local'].shape == (1, 2, 9) and seen['segment_ids_local'].dtype == np.uint8
  for key, value, match in [('crop_on', 'gpu', 'data.crop_on must be one of'),
                            ('canvas_size', (128,), 'data.canvas_size must be two positive'),
                            ('augment', 'lut', 'data.crop_on=device cuts the views of')]:
    bad = cfg.copy_and_resolve_references()
    bad[key] = value
    with pytest.raises(ValueError, match=match):
      pipeline.validate_data_config(bad)


def test_canvas_is_the_image_edge_padded_or_shrunk_to_fit():
  image = _images(6, 20, 24)[0]
  canvas, hw = aug_lib.to_canvas(image, (32, 30))
  assert hw == (20, 24)
  np.testing.assert_array_equal(canvas, np.pad(image, ((0, 12), (0, 6), (0, 0)), mode='edge'))
  canvas, hw = aug_lib.to_canvas(image, (10, 30))  # too tall: bicubic to 10 × 12, aspect kept
  assert canvas.shape == (10, 30, 3) and hw == (10, 12)


def test_device_crops_read_no_canvas_pixel_beyond_canvas_reach():
  """collate edge-replicates only `canvas_reach` pixels past the image and zeros the rest: the
  views are bit-identical to a fully edge-padded canvas whatever lies beyond that strip
  (random bytes here), for the worst boxes — the whole image and corners touching its
  right/bottom edge, cut to the smallest views (most shrunk: the kernel reaches farthest) and
  upsampled. Without the strip they are not (the check can fail)."""
  cfg = _crop_config('dino')
  reach = pipeline.canvas_reach(cfg)
  assert reach == 14  # ⌈2 · 160 / 24⌉
  image = _photo(90, 110)
  full, (h, w) = aug_lib.to_canvas(image, cfg.canvas_size)
  boxes = {'global': [[0, 0, 90, 110], [45, 55, 45, 55], [80, 100, 10, 10]],
           'local': [[0, 0, 90, 110], [60, 70, 30, 40], [0, 96, 90, 14]]}
  base = {f'boxes_{k}': np.asarray([b], np.int32) for k, b in boxes.items()}
  base.update({f'flips_{k}': np.asarray([[False, True, True]]) for k in boxes})
  cut = jax.jit(lambda b: da.crop_views(b, cfg))
  want = jax.device_get(cut(dict(base, canvas=full[None])))
  garbage = np.random.default_rng(0).integers(0, 256, full.shape, np.uint8)
  for pad in (reach, 0):
    canvas, _ = aug_lib.to_canvas(image, cfg.canvas_size, pad=pad)
    beyond = np.ones(full.shape[:2], bool)
    beyond[:h + pad, :w + pad] = False
    assert not canvas[beyond].any()  # zeros beyond the strip
    canvas[beyond] = garbage[beyond]
    got = jax.device_get(cut(dict(base, canvas=canvas[None])))
    same = all(np.array_equal(got[k], want[k]) for k in boxes)
    assert same == (pad == reach), pad


def _segments(h=120, w=160, period=(13, 17), num_ids=7):
  """A blocky uint8 id map (superpixel-like: regions of ~13 × 17 px, ids 0..num_ids-1)."""
  return (np.add.outer(np.arange(h) // period[0], np.arange(w) // period[1])
          % num_ids).astype(np.uint8)


def _pil_rows(extent, size):
  """The source pixel PIL's NEAREST resize of `extent` pixels to `size` reads per output pixel
  (a ramp through the host path's own resize)."""
  ramp = np.tile(np.arange(extent, dtype=np.int32), (2, 1))
  return aug_lib._resize(ramp, (2, size), aug_lib.NEAREST)[0]  # pylint: disable=protected-access


def test_nearest_crop_is_pil_nearest_but_at_exact_pixel_boundaries():
  """The device's NEAREST picks ⌊(2x + 1)·w / 2s⌋ exactly; PIL accumulates it in doubles. They
  agree everywhere but where (2x + 1)·w is a multiple of 2s (the sample lies exactly on a pixel
  boundary), where PIL may read the pixel before. Checked on 400 random boxes, both axes, and
  on the maps the host path cuts (same box, same flip) — equal when no boundary is hit."""
  rng = np.random.default_rng(0)
  h_map, w_map = 100, 130
  index_map = np.arange(h_map * w_map, dtype=np.int32).reshape(h_map, w_map)
  for size in (24, 48):
    boxes = np.array([aug_lib.rrc_params(rng, h_map, w_map, (0.05, 1.0))
                      for _ in range(200)], np.int32)
    flips = rng.uniform(size=len(boxes)) < 0.5
    got = jax.device_get(jax.jit(jax.vmap(lambda b, f: da.nearest_crop(index_map, b, f, size)))(
        boxes, flips))
    ties_seen = 0
    for (top, left, h, w), flip, g in zip(boxes, flips, got):
      want, _ = aug_lib.resized_crop(index_map, None, (top, left, h, w), size, aug_lib.NEAREST)
      want = want[:, ::-1] if flip else want
      x = np.arange(size)
      tie_r, tie_c = ((2 * x + 1) * h) % (2 * size) == 0, ((2 * x + 1) * w) % (2 * size) == 0
      if flip:
        tie_c = tie_c[::-1]
      if not (tie_r.any() or tie_c.any()):
        np.testing.assert_array_equal(g, want)
        continue
      ties_seen += 1
      dr, dc = g // w_map - want // w_map, g % w_map - want % w_map
      assert set(np.unique(dr)) <= {0, 1} and set(np.unique(dc)) <= {0, 1}
      assert not dr[~tie_r].any() and not dc[:, ~tie_c].any()
    assert ties_seen  # both branches ran
  x = np.arange(48)
  assert (_pil_rows(96, 48) == (2 * x + 1) * 96 // (2 * 48)).all()  # dyadic ties: exact


def test_device_patch_ids_follow_the_host_rule_exactly():
  """da.patch_ids = aug_lib.patch_segment_ids (majority, ties → lower id, ids ≥ num_ids do not
  vote): random maps (many ties in 4×4 patches), ids up to 11 with num_ids 8, and num_ids 0."""
  rng = np.random.default_rng(0)
  maps = rng.integers(0, 12, (6, 3, 16, 24), dtype=np.uint8)
  maps[0, 0] = 9  # a map of non-voters only → 0
  for num_ids in (8, 256, 0):
    got = jax.device_get(jax.jit(lambda m, k=num_ids: da.patch_ids(m, 4, k))(maps))
    want = aug_lib.patch_segment_ids(maps, 4, num_ids).reshape(6, 3, -1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('augment', ['dino', 'mae'])
def test_device_segment_ids_equal_the_host_path_for_the_same_draws(augment):
  """MRE with crop_on='device': the host ships the map on a canvas; the device cuts it with
  each view's box and flip and computes the patch ids. Against the host path (PIL crops, host
  ids) on the same draws: the maps differ only in rows/columns sampled exactly on a pixel
  boundary (test above), so an id can differ only in a patch where the cut maps differ; on
  this map, none does."""
  cfg = _crop_config(augment)
  cfg.update(segment_patch_size=8, segment_num_ids=8)
  maps_cfg = cfg.copy_and_resolve_references()
  maps_cfg.segment_patch_size = 0
  image, seg = _photo(), _segments()
  for seed in range(4):
    host, device, host_maps, device_maps = (
        pipeline.collate([dict(pipeline.augment_example(c, np.random.default_rng(seed), image,
                                                        seg, augment), label=0)], c)
        for c in (_host(cfg), cfg, _host(maps_cfg), maps_cfg))
    device = jax.device_get(jax.jit(lambda b: da.crop_views(b, cfg))(device))
    device_maps = jax.device_get(jax.jit(lambda b: da.crop_views(b, maps_cfg))(device_maps))
    for key in [k for k in host if k.startswith('segment_ids')]:
      map_key = 'segments' + key[len('segment_ids'):]
      differs = host_maps[map_key] != device_maps[map_key]
      n = differs.shape[-1] // 8
      patch_differs = differs.reshape(*differs.shape[:-2], n, 8, n, 8).any((-3, -1))
      assert host[key].shape == device[key].shape and device[key].dtype == np.uint8
      assert not (host[key] != device[key])[~patch_differs.reshape(host[key].shape)].any()
      np.testing.assert_array_equal(device[key], host[key])


def test_mre_rows_can_crop_on_the_device():
  cfg = mre_dino_config.get_config('tiny').data
  cfg.crop_on = 'device'
  pipeline.validate_data_config(cfg)
  assert pipeline.crops_on_device(cfg)


def test_device_crops_stay_on_their_rows_over_8_devices():
  cfg = _crop_config()
  cfg.segment_patch_size = 8
  rng = np.random.default_rng(0)
  batch = pipeline.collate([dict(pipeline.augment_example(cfg, rng, _photo(), _segments(), 'dino'),
                                 label=0) for _ in range(8)], cfg)
  sharded = NamedSharding(hlo.mesh_of(8), P('data'))
  fn = lambda b: da.crop_views(b, cfg)
  compiled = jax.jit(fn, in_shardings=(sharded,), out_shardings=sharded).lower(batch).compile()
  assert [s for s in hlo.all_gather_sizes(compiled) if s >= 8] == []
  eight = jax.device_get(compiled(jax.device_put(batch, sharded)))
  one = jax.device_get(jax.jit(fn)(batch))
  assert {'segment_ids_global', 'segment_ids_local'} <= set(one)
  for k in one:
    tolerance = 0 if k.startswith('segment_ids') else 1  # ids: integer arithmetic only
    assert np.abs(eight[k].astype(int) - one[k].astype(int)).max() <= tolerance
