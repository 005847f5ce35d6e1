"""MIM targets: HOG vs a PyTorch transcription of SlowFast `HOGLayerC`, pixels, token CE."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import skimage.data
import skimage.transform
import torch
import torch.nn.functional as F

from mimjax import hog as hog_lib
from mimjax import targets
from mimjax.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from mimjax.objectives import mae


def torch_gkern(kernlen, std):
  """SlowFast `get_gkern`."""
  n = torch.arange(0, kernlen).float()
  n -= n.mean()
  n /= std
  w = torch.exp(-0.5 * n ** 2)
  k = w[:, None] * w[None, :]
  return k / k.sum()


class TorchHOGLayerC(torch.nn.Module):
  """SlowFast slowfast/models/operators.py `HOGLayerC`, transcribed."""

  def __init__(self, nbins=9, pool=7, gaussian_window=0):
    super().__init__()
    self.nbins, self.pool, self.pi = nbins, pool, math.pi
    weight_x = torch.FloatTensor([[1, 0, -1], [2, 0, -2], [1, 0, -1]])
    weight_x = weight_x.view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    weight_y = weight_x.transpose(2, 3)
    self.register_buffer('weight_x', weight_x)
    self.register_buffer('weight_y', weight_y)
    self.gaussian_window = gaussian_window
    if gaussian_window:
      self.register_buffer('gkern', torch_gkern(gaussian_window, gaussian_window // 2))

  @torch.no_grad()
  def forward(self, x):  # x: (B, 3, H, W) normalised
    x = F.pad(x, pad=(1, 1, 1, 1), mode='reflect')
    gx_rgb = F.conv2d(x, self.weight_x, bias=None, stride=1, padding=0, groups=3)
    gy_rgb = F.conv2d(x, self.weight_y, bias=None, stride=1, padding=0, groups=3)
    norm_rgb = torch.stack([gx_rgb, gy_rgb], dim=-1).norm(dim=-1)
    phase = torch.atan2(gx_rgb, gy_rgb)
    phase = phase / self.pi * self.nbins
    b, c, h, w = norm_rgb.shape
    out = torch.zeros((b, c, self.nbins, h, w), dtype=torch.float, device=x.device)
    phase = phase.view(b, c, 1, h, w)
    norm_rgb = norm_rgb.view(b, c, 1, h, w)
    if self.gaussian_window:
      if h != self.gaussian_window:
        repeat_rate = h // self.gaussian_window
        temp_gkern = self.gkern.repeat([repeat_rate, repeat_rate])
      else:
        temp_gkern = self.gkern
      norm_rgb *= temp_gkern
    out.scatter_add_(2, phase.floor().long() % self.nbins, norm_rgb)
    out = out.unfold(3, self.pool, self.pool)
    out = out.unfold(4, self.pool, self.pool)
    out = out.sum(dim=[-1, -2])
    return F.normalize(out, p=2, dim=2)  # B 3 nbins H W


def torch_hog_label_2d(hog, num_patches_side):
  """SlowFast masked.py `_get_hog_label_2d` reshaping → (B, N, 3·9·u²)."""
  hog = hog.flatten(1, 2)
  unfold_size = hog.shape[-1] // num_patches_side
  hog = (hog.permute(0, 2, 3, 1).unfold(1, unfold_size, unfold_size)
         .unfold(2, unfold_size, unfold_size).flatten(1, 2).flatten(2))
  return hog


def photos_224():
  """Real photos: astronaut, coffee, chelsea, rocket centre-cropped and resized to 224."""
  out = []
  for name in ('astronaut', 'coffee', 'chelsea', 'rocket'):
    img = getattr(skimage.data, name)()
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    img = skimage.transform.resize(img, (224, 224), anti_aliasing=True, preserve_range=True)
    out.append(np.round(img).astype(np.uint8))
  x = np.stack(out).astype(np.float32) / 255.0
  return ((x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32))


@pytest.fixture(scope='module')
def photos():
  return photos_224()


@pytest.mark.parametrize('window', [0, 16])
def test_hog_matches_slowfast_reference_on_photos(photos, window):
  ours = np.asarray(jax.jit(lambda x: hog_lib.hog_targets(x, 16, 9, 8, window))(photos))
  ref_layer = TorchHOGLayerC(nbins=9, pool=8, gaussian_window=window)
  ref = torch_hog_label_2d(ref_layer(torch.from_numpy(photos).permute(0, 3, 1, 2)), 14).numpy()
  assert ours.shape == ref.shape == (4, 196, 108)
  rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  assert rel < 1e-4, rel
  assert np.abs(ours - ref).max() < 1e-3
  # A real image has texture: cells are non-degenerate and L2-normalised per (cell, channel).
  cells = np.asarray(hog_lib.hog_cells(photos, 9, 8, window))
  np.testing.assert_allclose(np.linalg.norm(cells, axis=-1).mean(), 1.0, atol=0.02)


def test_hog_hand_computed_vertical_edge():
  # Left half 0, right half 1: gx = left − right = −4 on the two edge columns, gy = 0 →
  # atan2(−4, 0) = −π/2 → −4.5 → floor −5 mod 9 = bin 4; magnitude 4 per edge pixel.
  img = np.zeros((1, 16, 16, 3), np.float32)
  img[:, :, 8:] = 1.0
  cells = np.asarray(hog_lib.hog_cells(img, 9, 8, 0))  # (1, 2, 2, 3, 9)
  expected = np.zeros(9, np.float32)
  expected[4] = 1.0  # one bin → L2-normalised to 1
  for r in range(2):
    for s in range(2):
      np.testing.assert_allclose(cells[0, r, s, 0], expected, atol=1e-6)
  flat = np.asarray(hog_lib.hog_targets(img, 16, 9, 8, 0))[0, 0]
  # Flatten order (channel, bin, cell row, cell col): channel 1, bin 4, cell (1, 0).
  assert flat[((1 * 9 + 4) * 2 + 1) * 2 + 0] == pytest.approx(1.0)
  assert hog_lib.hog_dim(16) == 108


def test_gaussian_window_matches_formula():
  k = hog_lib.gaussian_window(16)
  n = (np.arange(16) - 7.5) / 8
  w = np.exp(-0.5 * n ** 2)
  np.testing.assert_allclose(k, np.outer(w, w) / np.outer(w, w).sum(), rtol=1e-6)


def _config(**kw):
  return ml_collections.ConfigDict(kw)


def test_make_target_pixel_reuses_mae_and_hog_dims(photos):
  x = jnp.asarray(photos[:2, :32, :32])
  pix = targets.make_target(_config(target='pixel', norm_pix=True), 8)
  np.testing.assert_array_equal(np.asarray(pix.fn(x)), np.asarray(mae.pixel_targets(x, 8, True)))
  assert pix.dim == 192 and not pix.classification
  hog = targets.make_target(_config(target='hog', hog={'cell_size': 4, 'gaussian_window': 8}), 8)
  assert hog.fn(x).shape == (2, 16, hog.dim) and hog.dim == 108
  with pytest.raises(ValueError, match='config.target'):
    targets.make_target(_config(target='clip'), 8)


def test_target_loss_cross_entropy_and_mse_by_hand():
  ce = targets.Target(None, 3, True)
  logits = jnp.asarray([[[0.0, 0.0, np.log(2.0)], [1.0, 1.0, 1.0]]])
  labels = jnp.asarray([[2, 0]])
  # −log(2/4) = log 2 on patch 0; −log(1/3) = log 3 on patch 1; weights pick patch 1 only.
  assert float(targets.target_loss(ce, logits, labels)) == pytest.approx(
      (np.log(2) + np.log(3)) / 2, rel=1e-6)
  assert float(targets.target_loss(ce, logits, labels, jnp.asarray([[0.0, 1.0]]))) == \
      pytest.approx(np.log(3), rel=1e-6)
  mse = targets.Target(None, 2, False)
  pred = jnp.asarray([[[1.0, 3.0], [0.0, 0.0]]])
  assert float(targets.target_loss(mse, pred, jnp.zeros((1, 2, 2)))) == pytest.approx(2.5)


def test_kmeans_recovers_separated_clusters_and_nearest_matches_bruteforce():
  from mimjax import tokenizer
  rng = np.random.default_rng(0)
  centres = np.asarray([[0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]], np.float32)
  x = np.concatenate([c + 0.1 * rng.normal(size=(50, 3)) for c in centres]).astype(np.float32)
  book = tokenizer.fit_kmeans(x, 4, iters=10, seed=0)
  order = np.argsort(np.linalg.norm(book - centres[:, None], axis=-1).argmin(0))
  np.testing.assert_allclose(np.sort(book, 0), np.sort(centres, 0), atol=0.1)
  q = rng.normal(size=(7, 3)).astype(np.float32) * 6
  brute = np.argmin(((q[:, None] - book[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(np.asarray(tokenizer.nearest(jnp.asarray(q), jnp.asarray(book))),
                                brute)
  assert sorted(order) == [0, 1, 2, 3]


def test_kmeans_hog_tokenizer_ids_are_nearest_hog_codewords(tmp_path, photos):
  from configs import beit as beit_config
  from mimjax import tokenizer
  config = beit_config.get_config('tiny')
  config.tokenizer.vocab_size = 16
  book = tokenizer.fit_codebook(config, num_images=32)
  assert book.shape == (16, 108) and np.isfinite(book).all()
  path = tmp_path / 'codebook.npy'
  np.save(path, book)
  config.tokenizer.codebook = str(path)
  tok = tokenizer.make_tokenizer(config, 4)
  x = jnp.asarray(photos[:2, :32, :32])
  ids = np.asarray(tok(x))
  feats = np.asarray(hog_lib.hog_targets(x, 4, 9, 2, 4))
  brute = np.argmin(((feats[..., None, :] - book) ** 2).sum(-1), axis=-1)
  assert ids.shape == (2, 64) and tok.vocab_size == 16
  np.testing.assert_array_equal(ids, brute)
  target = targets.make_target(config, 4)
  assert target.classification and target.dim == 16
  np.testing.assert_array_equal(np.asarray(target.fn(x)), ids)


@pytest.mark.slow
def test_tokenizer_fit_command(tmp_path):
  import subprocess
  import sys
  out = tmp_path / 'book.npy'
  repo = __file__.rsplit('/tests/', 1)[0]
  subprocess.run([sys.executable, '-m', 'mimjax.tokenizer', 'fit', '--config',
                  'configs/beit.py:tiny', '--out', str(out), '--num_images', '64',
                  '--vocab_size', '8'], cwd=repo, check=True)
  assert np.load(out).shape == (8, 108)
