"""On-device RandomErasing against timm's `RandomErasing` (box logic and statistics)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mimjax.data import erasing


class _ReplayRandom:
  """Stands in for Python's `random` inside timm's RandomErasing, replaying given uniforms
  (uniform(a, b) = a + (b − a)·u and randint(a, b) = a + ⌊u·(b − a + 1)⌋, as in
  `erasing_boxes`), so both implementations see the same draws."""

  def __init__(self, u, min_area, max_area, counted):
    self.u, self.area_range, self.counted = u, (min_area, max_area), counted
    self.i = -1

  def random(self):
    self.i += 1  # timm draws the apply coin first, once per example
    self.k, self.attempt, self.want, self.need_count = 0, 0, 'top', self.counted
    return float(self.u['apply'][self.i])

  def uniform(self, a, b):
    if (a, b) == self.area_range:
      if self.attempt == erasing.ATTEMPTS:  # the previous box never fitted: next box
        self.k, self.attempt = self.k + 1, 0
      v = self.u['area'][self.i, self.k, self.attempt]
    else:
      v = self.u['aspect'][self.i, self.k, self.attempt]
      self.attempt += 1
    return a + (b - a) * float(v)

  def randint(self, a, b):
    if self.need_count:
      self.need_count = False
      v = self.u['count'][self.i]
    elif self.want == 'top':
      self.want, v = 'left', self.u['top'][self.i, self.k]
    else:
      self.want, v = 'top', self.u['left'][self.i, self.k]
      self.k, self.attempt = self.k + 1, 0
    return a + int(math.floor(float(v) * (b - a + 1)))


# One compiled program per call instead of one per primitive (eager JAX compiles each op on
# its own: most of these tests' time); the Python options are static.
_boxes = jax.jit(erasing.erasing_boxes, static_argnums=(6, 7), static_argnames=(
    'probability', 'min_area', 'max_area', 'min_count', 'max_count'))
_erase = jax.jit(erasing.random_erasing, static_argnames='probability')


def _uniforms(seed, b, k):
  r = np.random.default_rng(seed)
  f = lambda *shape: r.random(shape).astype(np.float32)
  return {'apply': f(b), 'count': f(b), 'area': f(b, k, erasing.ATTEMPTS),
          'aspect': f(b, k, erasing.ATTEMPTS), 'top': f(b, k), 'left': f(b, k)}


@pytest.mark.parametrize('height,width,min_count,max_count,min_area',
                         [(32, 32, 1, 1, 0.02), (24, 40, 1, 3, 0.02), (16, 16, 1, 1, 0.6)])
def test_boxes_equal_timm_loop(monkeypatch, height, width, min_count, max_count, min_area):
  """Same uniforms → the same erased pixels as timm's RandomErasing._erase ('const' mode on
  an all-ones image, so erased = 0). min_area 0.6 makes many attempts fail (no box)."""
  import torch
  from timm.data import random_erasing as timm_re
  b, p, max_area = 300, 0.5, 0.9 if min_area > 0.5 else 1 / 3
  u = _uniforms(height * width + max_count, b, max_count)
  monkeypatch.setattr(timm_re, 'random',
                      _ReplayRandom(u, min_area, max_area, min_count != max_count))
  ref = timm_re.RandomErasing(p, min_area=min_area, max_area=max_area, mode='const',
                              min_count=min_count, max_count=max_count, device='cpu')
  x = torch.ones(b, 3, height, width)
  want = (ref(x)[:, 0] == 0).numpy()
  active, boxes = _boxes(
      *(jnp.asarray(u[k]) for k in ('apply', 'count', 'area', 'aspect', 'top', 'left')),
      height, width, probability=p, min_area=min_area, max_area=max_area,
      min_count=min_count, max_count=max_count)
  active, boxes = np.asarray(active), np.asarray(boxes)
  got = np.zeros((b, height, width), bool)
  for i, k in zip(*np.nonzero(active)):
    top, left, h, w = boxes[i, k]
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    got[i, top:top + h, left:left + w] = True
  np.testing.assert_array_equal(got, want)
  assert 0.2 < want.any(axis=(1, 2)).mean() < 0.7  # both outcomes occur (p = 0.5)


def test_statistics_match_timm_random_erasing():
  """p 0.25 'pixel', count 1 on 32×32: erase rate and erased-area fraction vs timm's real
  (torch-random) RandomErasing; noise inside ~ N(0, 1); pixels outside untouched."""
  import random
  import torch
  from timm.data.random_erasing import RandomErasing
  n, hw = 3000, 32
  random.seed(0)
  torch.manual_seed(0)
  ref = RandomErasing(0.25, mode='pixel', max_count=1, device='cpu')
  x = torch.full((n, 3, hw, hw), 7.0)
  ref_mask = (ref(x) != 7.0).any(1).numpy()
  images = jnp.full((n, hw, hw, 3), 7.0)
  out = np.asarray(_erase(jax.random.PRNGKey(0), images, probability=0.25))
  mask = (out != 7.0).any(-1)
  for m in (ref_mask, mask):
    assert abs(m.any(axis=(1, 2)).mean() - 0.25) < 0.025
  frac = lambda m: m[m.any(axis=(1, 2))].mean(axis=(1, 2))
  assert abs(frac(mask).mean() - frac(ref_mask).mean()) < 0.015
  assert abs(np.median(frac(mask)) - np.median(frac(ref_mask))) < 0.02
  noise = out[mask]
  assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01
  assert (out[~mask] == 7.0).all()
  # every erased region is one axis-aligned box
  for m in mask[mask.any(axis=(1, 2))][:50]:
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    assert m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()


def test_modes_probability_and_determinism():
  images = jax.random.normal(jax.random.PRNGKey(1), (64, 16, 16, 3))
  key = jax.random.PRNGKey(2)
  always = erasing.random_erasing(key, images, probability=1.0, mode='const')
  changed = np.asarray(always != images).any(-1)
  assert changed.any(axis=(1, 2)).all()                 # p = 1: every example has a box
  assert (np.asarray(always)[changed] == 0).all()       # 'const' fills zeros
  rand = np.asarray(erasing.random_erasing(key, images, probability=1.0, mode='rand'))
  box = np.asarray(rand != images).any(-1)
  np.testing.assert_array_equal(box, changed)           # same key → same boxes
  for i in range(8):  # 'rand': one colour per box, per channel
    vals = rand[i][box[i]]
    np.testing.assert_allclose(vals, np.broadcast_to(vals[:1], vals.shape))
  np.testing.assert_array_equal(erasing.random_erasing(key, images, probability=0.0), images)
  a = erasing.random_erasing(key, images)
  np.testing.assert_array_equal(a, erasing.random_erasing(key, images))
  assert not np.array_equal(a, erasing.random_erasing(jax.random.PRNGKey(3), images))
  jitted = jax.jit(lambda k, x: erasing.random_erasing(k, x, probability=0.25))(key, images)
  np.testing.assert_allclose(jitted, a, rtol=1e-6)  # fused vs eager: last-bit rounding
  with pytest.raises(ValueError, match="mode must be one of"):
    erasing.random_erasing(key, images, mode='pixels')


def test_finetune_config_validates_erasing_keys():
  from configs.eval import finetune as finetune_config
  from mimjax.objectives import finetune
  tiny = finetune_config.get_config('tiny')  # regularisers off at laptop scale (its docstring)
  assert (tiny.finetune.reprob, tiny.finetune.mixup, tiny.data.randaug_num_ops) == (0, 0, 0)
  config = finetune_config.get_config('vit_b,in1k')
  assert (config.finetune.reprob, config.finetune.remode, config.finetune.recount) == (
      0.25, 'pixel', 1)
  assert config.data.augment == 'finetune'
  assert (config.data.randaug_num_ops, config.data.randaug_magnitude,
          config.data.randaug_mstd) == (2, 9.0, 0.5)
  for key, value in (('reprob', 1.5), ('remode', 'noise'), ('recount', 0)):
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.finetune[key] = value
    with pytest.raises(ValueError, match=f'config.finetune.{key}='):
      finetune.make(bad)
