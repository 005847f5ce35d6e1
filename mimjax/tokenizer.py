"""Frozen patch tokenizers for BEiT-style token targets, and the k-means codebook fitter.

  python -m mimjax.tokenizer fit --config configs/beit.py:tiny --out /tmp/codebook.npy
  python -m mimjax.main --config configs/beit.py:tiny --workdir /tmp/beit_tiny \
      --config.tokenizer.codebook=/tmp/codebook.npy

A tokenizer is anything with `vocab_size` and `__call__(images) -> (B, N) int32` on normalised
NHWC images (one id per patch, patches row-major). We ship `KMeansHOGTokenizer`: the nearest
centre of a k-means codebook fitted on per-patch HOG features (same `config.hog` as the HOG
target). To plug in a learned tokenizer (BEiT's DALL-E dVAE), wrap it in a class with these two
members and pass it as `semantic_mim.make(config, tokenizer=...)` (docs/semantic_mim.md).

The fit scales to the documented defaults (3.92M vectors, 8192 centres): the vectors are split
by rows over the mesh, Lloyd steps assign `fit_chunk` rows at a time with running sums (no
N × K matrix), and k-means++ seeds on a `fit_seed_sample` subsample (docs/semantic_mim.md).
"""

import functools
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from mimjax import hog as hog_lib
from mimjax import sharding

TOKENIZERS = ('kmeans_hog',)


class Tokenizer(Protocol):
  """Maps normalised images (B, H, W, 3) to token ids (B, N) in [0, vocab_size)."""
  vocab_size: int

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    ...


def default_tokenizer_config() -> ml_collections.ConfigDict:
  """config.tokenizer: kind, codebook path, and the fitting knobs of `fit` (`fit_chunk`: rows
  per device per assignment block; `fit_seed_sample`: k-means++ subsample, 0 = 3·vocab)."""
  return ml_collections.ConfigDict({'kind': 'kmeans_hog', 'codebook': '', 'vocab_size': 8192,
                                    'fit_images': 20000, 'fit_iters': 20, 'fit_on_start': False,
                                    'fit_chunk': 16384, 'fit_seed_sample': 0})


class KMeansHOGTokenizer:
  """Token id = index of the nearest (squared L2) codebook row to the patch's HOG feature."""

  def __init__(self, codebook: np.ndarray, patch_size: int, hog: ml_collections.ConfigDict):
    self.codebook = jnp.asarray(codebook, jnp.float32)
    self.vocab_size = int(codebook.shape[0])
    self.patch_size, self.hog = patch_size, hog

  def features(self, images: jnp.ndarray) -> jnp.ndarray:
    """Per-patch HOG features (B, N, d)."""
    h = self.hog
    return hog_lib.hog_targets(images, self.patch_size, h.nbins, h.cell_size, h.gaussian_window)

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    return nearest(self.features(images), self.codebook)


def _half_distances(x: jnp.ndarray, codebook: jnp.ndarray) -> jnp.ndarray:
  """||c_k||² − 2 x·c_k (= ||x − c_k||² − ||x||²) over the last axis of x."""
  return (jnp.sum(codebook * codebook, axis=-1)
          - 2 * jnp.einsum('...d,kd->...k', x, codebook, precision='highest'))


def nearest(x: jnp.ndarray, codebook: jnp.ndarray) -> jnp.ndarray:
  """argmin_k ||x − c_k||² over the last axis of x → int32 ids."""
  return jnp.argmin(_half_distances(x, codebook), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=1)
def kmeans_plus_plus(x: jnp.ndarray, k: int, key: jax.Array) -> jnp.ndarray:
  """k-means++ seeding (Arthur & Vassilvitskii 2007) on the rows of x: k − 1 passes over x."""
  first = x[jax.random.randint(jax.random.fold_in(key, 0), (), 0, x.shape[0])]
  d2 = jnp.sum((x - first) ** 2, axis=1)
  centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)

  def pick(i, carry):
    centres, d2 = carry
    # P(row) ∝ D(row)²; all-zero distances (k > distinct rows) fall back to uniform.
    logits = jnp.where(d2.sum() > 0, jnp.where(d2 > 0, jnp.log(d2), -jnp.inf), 0.0)
    c = x[jax.random.categorical(jax.random.fold_in(key, i), logits)]
    return centres.at[i].set(c), jnp.minimum(d2, jnp.sum((x - c) ** 2, axis=1))

  return jax.lax.fori_loop(1, k, pick, (centres, d2))[0]


@functools.lru_cache(maxsize=None)
def lloyd_step(mesh) -> Callable:
  """jit(x (B, chunk, d), weights (B, chunk), centres (K, d)) → (new centres, objective).

  x/weights are split over every device of `mesh` on B (`sharding.shard_rows`; weight 0 marks
  padding). Each device assigns its rows chunk by chunk — a (chunk, K) distance block at a
  time, never the full N×K matrix — into running per-centre sums and counts, which are then
  summed over the mesh. objective = Σ w·min_k ||x − c_k||² for the centres passed in; an
  emptied cluster keeps its previous centre."""
  axes = sharding.BATCH_AXES

  def local(x, w, centres):
    k = centres.shape[0]

    def assign(carry, block):
      sums, counts, objective = carry
      xb, wb = block
      dist = _half_distances(xb, centres)
      ids = jnp.argmin(dist, axis=-1)
      best = jnp.take_along_axis(dist, ids[:, None], axis=1)[:, 0] + jnp.sum(xb * xb, -1)
      return (sums + jax.ops.segment_sum(xb * wb[:, None], ids, num_segments=k),
              counts + jax.ops.segment_sum(wb, ids, num_segments=k),
              objective + jnp.sum(wb * best)), None

    init = (jnp.zeros_like(centres), jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32))
    sums, counts, objective = jax.lax.psum(jax.lax.scan(assign, init, (x, w))[0], axes)
    new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centres)
    return new, objective

  spec = P(axes)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P()),
                               out_specs=(P(), P()), check_vma=False))


def fit_kmeans(x: np.ndarray, k: int, iters: int = 20, seed: int = 0, *, mesh=None,
               chunk: int = 16384, seed_sample: int = 0) -> np.ndarray:
  """Lloyd's k-means from k-means++ seeds drawn on a uniform random subsample of
  `seed_sample` rows (0: 3·k, scikit-learn MiniBatchKMeans' `init_size` rule); the rows are
  split over `mesh` and assigned `chunk` rows at a time (see `lloyd_step`)."""
  x = np.asarray(x, np.float32)
  if len(x) < k:
    raise ValueError(f'k-means: {len(x)} features < vocab_size {k}; fit on more images '
                     '(config.tokenizer.fit_images) or lower config.tokenizer.vocab_size')
  mesh = mesh or sharding.default_mesh()
  rng = np.random.default_rng(seed)
  sample = x[np.sort(rng.choice(len(x), min(len(x), seed_sample or 3 * k), replace=False))]
  centres = kmeans_plus_plus(jnp.asarray(sample), k, jax.random.key(seed))
  chunk = sharding.row_chunk(len(x), mesh, chunk)
  xs = sharding.shard_rows(x, mesh, chunk)
  weights = sharding.shard_rows(np.ones(len(x), np.float32), mesh, chunk)
  centres = jax.device_put(centres, sharding.replicated(mesh))
  step = lloyd_step(mesh)
  for i in range(iters):
    centres, objective = step(xs, weights, centres)
    logging.info('k-means step %d: objective %.6g', i, float(objective))
  return np.asarray(centres)


def make_tokenizer(config: ml_collections.ConfigDict, patch_size: int) -> Tokenizer:
  """The tokenizer of `config.tokenizer` (kind 'kmeans_hog' with a fitted `codebook` .npy)."""
  cfg = config.get('tokenizer') or default_tokenizer_config()
  if cfg.get('kind') not in TOKENIZERS:
    raise ValueError(f'config.tokenizer.kind={cfg.get("kind")!r}: expected one of {TOKENIZERS}')
  path = cfg.get('codebook')
  if not path and cfg.get('fit_on_start'):
    # CPU-sized configs only: fit a small codebook in memory so `tiny` runs in one command.
    return KMeansHOGTokenizer(fit_codebook(config), patch_size, hog_lib.hog_config(config))
  if not path:
    raise ValueError('config.target="tokens" needs config.tokenizer.codebook: fit one with '
                     '`python -m mimjax.tokenizer fit --config <same config> --out codebook.npy`')
  codebook = np.load(path)
  hog = hog_lib.hog_config(config)
  want = hog_lib.hog_dim(patch_size, hog.nbins, hog.cell_size)
  if codebook.ndim != 2 or codebook.shape[1] != want:
    raise ValueError(f'config.tokenizer.codebook={path!r}: shape {codebook.shape}, expected '
                     f'(vocab, {want}) for patch {patch_size} and config.hog {hog.to_dict()}')
  return KMeansHOGTokenizer(codebook, patch_size, hog)


def fit_codebook(config: ml_collections.ConfigDict, num_images=None, vocab_size=None,
                 iters=None) -> np.ndarray:
  """Fits the k-means codebook on HOG features of `num_images` eval-view training images."""
  from mimjax.data import pipeline
  from mimjax.data.normalize import normalize_images
  from mimjax.models.vit import model_dims

  tok = config.get('tokenizer') or default_tokenizer_config()
  num_images = int(num_images or tok.fit_images)
  vocab_size = int(vocab_size or tok.vocab_size)
  patch = model_dims(config.model)['patch_size']
  hog = hog_lib.hog_config(config)
  num_images = min(num_images, pipeline.num_examples(config.data, 'train'))
  batch = min(256, num_images)
  loader = pipeline.make_loader(config.data, global_batch_size=batch, seed=config.seed,
                                split='train', train=False)
  feats = jax.jit(lambda x: hog_lib.hog_targets(normalize_images(x), patch, hog.nbins,
                                                hog.cell_size, hog.gaussian_window))
  out, seen = [], 0
  while seen < num_images:
    f = np.asarray(feats(next(loader)['image']))[:num_images - seen]  # (b, N, d)
    out.append(f.reshape(-1, f.shape[-1]))
    seen += f.shape[0]
  x = np.concatenate(out)
  logging.info('k-means: %d HOG features of dim %d → %d tokens', len(x), x.shape[1], vocab_size)
  mesh = sharding.make_mesh(config.mesh) if config.get('mesh') else None
  return fit_kmeans(x, vocab_size, int(iters or tok.fit_iters), config.seed, mesh=mesh,
                    chunk=int(tok.get('fit_chunk', 16384)),
                    seed_sample=int(tok.get('fit_seed_sample', 0)))


def main(argv):
  """`fit`: fits the codebook of --config and writes it to --out."""
  if len(argv) != 2 or argv[1] != 'fit':
    raise app.UsageError('usage: python -m mimjax.tokenizer fit --config C --out codebook.npy')
  if not flags.FLAGS.out:
    raise app.UsageError('--out is required')
  from mimjax import cli
  f = flags.FLAGS
  codebook = fit_codebook(cli.config_value(f['config'], 'mimjax.tokenizer'), f.num_images,
                          f.vocab_size)
  np.save(f.out, codebook)
  print(f'wrote {f.out}: codebook {codebook.shape}')


def _define_flags() -> None:
  # Defined only when run as a command, so importing this module never clashes with main.py.
  config_flags.DEFINE_config_file('config', None, 'configs/X.py:ARG', lock_config=True)
  flags.DEFINE_string('out', None, 'Where to write the (vocab, d) codebook .npy.')
  flags.DEFINE_integer('num_images', None, 'Images to fit on (default: config).')
  flags.DEFINE_integer('vocab_size', None, 'Codebook size (default: config).')


if __name__ == '__main__':
  from mimjax import cli
  _define_flags()
  cli.run_absl(main, 'mimjax.tokenizer')
