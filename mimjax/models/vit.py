"""Vision Transformer encoder (pre-norm, exact GELU, fixed 2-D sincos or learned pos-embed).

Parameter names follow timm (`patch_embed/proj`, `cls_token`, `pos_embed`,
`blocks_{i}/{norm1,attn/{qkv,proj},norm2,mlp/{fc1,fc2}}`, `norm`) so conversion to and from
PyTorch is a transpose per tensor. With `model.scan_layers` the blocks are stacked under
`blocks` on a leading layer axis (mimjax.models.layout converts between the two).
"""

from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimjax.models import segment_bias as segment_bias_lib
from mimjax.models.attention import Attention, xavier
from mimjax.models.segment_bias import SegmentTerms

# (width, depth, num_heads, mlp_dim). 'mu' is a CPU test size, not from a paper.
VARIANTS = {
    'mu': (64, 2, 4, 256),
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
    'H': (1280, 32, 16, 5120),
}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def decode_variant(variant: str) -> dict:
  """'B/16' → dict(width, depth, num_heads, mlp_dim, patch_size)."""
  try:
    name, patch = variant.split('/')
    width, depth, heads, mlp = VARIANTS[name]
    patch = int(patch)
  except (ValueError, KeyError) as e:
    raise ValueError(f'model.variant={variant!r}: expected NAME/PATCH with NAME in '
                     f'{sorted(VARIANTS)}, e.g. "B/16"') from e
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=patch)


def model_dims(config: ml_collections.ConfigDict) -> dict:
  """Variant sizes with any explicit `width/depth/num_heads/mlp_dim/patch_size` overrides."""
  dims = decode_variant(config.variant)
  for key in dims:
    if config.get(key) is not None:
      dims[key] = int(config[key])
  return dims


def describe_variant(config: ml_collections.ConfigDict) -> str:
  """'mu/4 (width 64, depth 2, 4 heads, 4-px patches)': the variant name with its sizes (a name
  such as 'mu', the CPU test size, says nothing by itself)."""
  d = model_dims(config)
  return (f'{config.variant} (width {d["width"]}, depth {d["depth"]}, {d["num_heads"]} heads, '
          f'{d["patch_size"]}-px patches)')


def sincos_pos_embed_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """MAE's 1-D sincos: first dim/2 sin(pos·ω), next dim/2 cos(pos·ω), ω_k = 10000^(-k/(dim/2))."""
  if dim % 2:
    raise ValueError(f'sincos embedding dim must be even, got {dim}')
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
  """MAE `get_2d_sincos_pos_embed`: (grid², dim) [+ a zero cls row]; first half encodes the column."""
  if dim % 4:
    raise ValueError(f'2-D sincos embedding dim must be a multiple of 4, got {dim}')
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing='ij')
  emb = np.concatenate([sincos_pos_embed_1d(dim // 2, cols), sincos_pos_embed_1d(dim // 2, rows)],
                       axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
  return emb.astype(np.float32)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """torch `get_cubic_upsample_coefficients`: the 4 Keys-cubic tap weights (a = −0.75) at
  offsets −1, 0, 1, 2 from floor(src), for fractional positions t (float32, as torch)."""
  one = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1             # |x| ≤ 1
  two = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a       # 1 < |x| < 2
  t = t.astype(np.float32)
  return np.stack([two(t + 1), one(t), one(1 - t), two(2 - t)], axis=-1).astype(np.float32)


def torch_bicubic_matrix(in_size: int, scale_factor: float) -> np.ndarray:
  """(out, in) matrix of torch `F.interpolate(mode='bicubic', scale_factor=s,
  align_corners=False)` along one axis (no anti-aliasing, recompute_scale_factor unset).

  out = floor(in·s); the source coordinate uses the given s, not out/in:
  src = (dst + 0.5)/s − 0.5 in float32, taps floor(src) − 1 … + 2 clamped to the edge.
  """
  out_size = int(np.floor(in_size * scale_factor))
  ratio = np.float32(1.0 / scale_factor)                          # computed in double, as torch
  src = ratio * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - idx.astype(np.float32), 0, 1)
  taps = np.clip(idx[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
  mat = np.zeros((out_size, in_size), np.float32)
  np.add.at(mat, (np.repeat(np.arange(out_size), 4), taps.ravel()), _cubic_weights(t).ravel())
  return mat


def resize_pos_embed(pos: jnp.ndarray, num_prefix: int, grid: int) -> jnp.ndarray:
  """The patch part of a (1, prefix + g², D) pos-embed resized to grid² rows as DINO's
  `interpolate_pos_encoding` does: bicubic (a = −0.75, no anti-aliasing) with
  scale_factor (grid + 0.1)/g (the +0.1 avoids floating-point error in the output size)."""
  prefix, patch = pos[:, :num_prefix], pos[:, num_prefix:]
  old = int(round(patch.shape[1] ** 0.5))
  if old == grid:
    return pos
  mat = jnp.asarray(torch_bicubic_matrix(old, (grid + 0.1) / old))
  if mat.shape[0] != grid:
    raise ValueError(f'pos-embed resize {old}→{grid} gives a {mat.shape[0]}-row grid')
  patch = patch.reshape(old, old, -1)
  patch = jnp.einsum('ri,ijd,cj->rcd', mat, patch.astype(jnp.float32), mat,
                     precision=jax.lax.Precision.HIGHEST).astype(pos.dtype)
  return jnp.concatenate([prefix, patch.reshape(1, grid * grid, -1)], axis=1)


class Mlp(nn.Module):
  """fc1 → exact GELU → fc2."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    out = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=xavier, name='fc1')(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(out, dtype=self.dtype, kernel_init=xavier, name='fc2')(x)


class DropPath(NamedTuple):
  """One block's drop path (stochastic depth): its rate and the key of its keep masks."""
  rate: Any            # float or () float32 (traced when the layers are scanned)
  key: jnp.ndarray     # PRNG key


def drop_path(x: jnp.ndarray, rate: Any, key: jnp.ndarray) -> jnp.ndarray:
  """Drops whole samples' residual branches with probability `rate`, scaling the kept ones by
  1/(1 − rate): an explicit Bernoulli keep mask per sample, so `rate` may be traced."""
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


def drop_path_rates(depth: int, rate: float) -> np.ndarray:
  """(depth,) per-block drop-path rates, linear from 0 to `rate` (timm/MAE)."""
  return (rate * np.arange(depth) / max(depth - 1, 1)).astype(np.float32)


class Block(nn.Module):
  """Pre-norm transformer block; with `kv` it is a cross-attention block (kv shares norm1).

  Everything static is an attribute, every call argument is an array or None, so `nn.remat`
  and `nn.scan` wrap it without static argument indices. `drop` = this block's `DropPath`
  (None: no drop path, e.g. at eval). Returns (x, attention map or None).
  """
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  attention: str = 'xla'
  return_attention: bool = False

  @nn.compact
  def __call__(self, x, kv=None, segments: Optional[SegmentTerms] = None,
               drop: Optional[DropPath] = None):
    norm1 = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm1')
    y, attn = Attention(self.num_heads, dtype=self.dtype, implementation=self.attention,
                        name='attn')(norm1(x), None if kv is None else norm1(kv),
                                     segments=segments, return_attention=self.return_attention)
    keys = (None, None) if drop is None else jax.random.split(drop.key)
    branch = lambda y, key: y if key is None else drop_path(y, drop.rate, key)
    x = x + branch(y, keys[0])
    y = Mlp(self.mlp_dim, dtype=self.dtype, name='mlp')(
        nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm2')(x))
    return x + branch(y, keys[1]), attn


class LayerOutputs(NamedTuple):
  """What a block stack returns besides its output: per-block lists (empty unless asked)."""
  layers: list       # block outputs (B, T, D), pre final norm
  attention: list    # softmax maps (B, heads, T, T)


def block_stack(x: jnp.ndarray, per_layer: Any, step: Callable, *, depth: int,
                make_block: Callable[[str], nn.Module], scan: bool, name: str = 'blocks',
                return_layers: bool = False,
                return_attention: bool = False) -> tuple[jnp.ndarray, LayerOutputs]:
  """Runs x through `depth` blocks created in the calling module: unrolled as `{name}_{i}`, or
  with `scan` one `nn.scan` over a block named `name` whose params carry a leading layer axis.

  `per_layer`: a pytree of arrays with a leading depth axis (None leaves allowed); block i gets
  row i. `step(block, x, row) → (x, attention map or None)` runs one block. Both layouts give
  the same per-block lists, so readouts never see the layout.
  """
  if scan:
    def body(block, carry, row):
      y, attn = step(block, carry, row)
      return y, (y if return_layers else None, attn if return_attention else None)
    scanned = nn.scan(body, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True}, length=depth)
    x, (layers, attn) = scanned(make_block(name), x, per_layer)
    rows = lambda t: [] if t is None else [t[i] for i in range(depth)]
    return x, LayerOutputs(rows(layers), rows(attn))
  out = LayerOutputs([], [])
  for i in range(depth):
    x, attn = step(make_block(f'{name}_{i}'), x, jax.tree.map(lambda t: t[i], per_layer))
    if return_layers:
      out.layers.append(x)
    if return_attention:
      out.attention.append(attn)
  return x, out


def block_factory(config: ml_collections.ConfigDict, *, num_heads: int, mlp_dim: int,
                  return_attention: bool = False) -> Callable[[str], nn.Module]:
  """name → a `Block` (remat-wrapped when config.remat) with config's dtype and attention."""
  cls = nn.remat(Block) if config.get('remat') else Block
  return lambda name: cls(num_heads, mlp_dim, dtype=DTYPES[config.get('dtype', 'float32')],
                          attention=config.get('attention', 'xla'),
                          return_attention=return_attention, name=name)


def drop_paths(module: nn.Module, depth: int, rate: float, train: bool) -> Optional[DropPath]:
  """Every block's `DropPath` (rates and keys with a leading depth axis), or None when
  there is no drop path (eval, or rate 0). One 'dropout' key split per block, the same split
  whether the blocks are scanned or unrolled."""
  if not train or not rate:
    return None
  return DropPath(jnp.asarray(drop_path_rates(depth, rate)),
                  jax.random.split(module.make_rng('dropout'), depth))


class PatchEmbed(nn.Module):
  """Conv p×p stride p; MAE init: xavier on the (D, 3p²) view, PyTorch-default bias."""
  width: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    fan_in = images.shape[-1] * p * p
    bound = 1.0 / np.sqrt(fan_in)
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                kernel_init=nn.initializers.variance_scaling(
                    1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=-1),
                bias_init=lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound),
                name='proj')(images)
    return x.reshape(x.shape[0], -1, self.width)  # row-major patch order, as torch flatten(2)


class ViT(nn.Module):
  """ViT encoder; `keep_ids` (B, n) selects visible patches (MAE) before the blocks.

  `segment_ids` (B, N) patch segment ids switch on the MRE bias when
  `config.segment_bias.enabled` (without them the model runs as a plain ViT; the
  `segment_bias` params exist either way). `config.scan_layers`: the blocks are one `nn.scan`
  with params `blocks/...` stacked on a leading layer axis instead of `blocks_{i}/...`
  (mimjax.models.layout converts); the outputs are the same.
  `config.num_prefix_tokens` (default 1) = cls + extra prefix tokens (SemanticMIM proxies,
  registers), stored as `cls_token` (1, 1, D) + `reg_token` (1, k - 1, D) like timm, each with
  its own pos-embed row. `mask` (B, N) with `mask_token` (broadcast to (B, N, D)) replaces
  masked patch embeddings by the mask token before the pos-embed is added (BEiT/MaskFeat
  full-sequence encoders).
  Returns `(tokens, aux)`: tokens = final-LayerNorm output (B, k + n, D) with the prefix tokens
  first; aux = {'layers': per-block outputs (pre final norm)} and {'attention': per-block
  softmax maps (B, heads, T, T)} when requested.
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, keep_ids: Optional[jnp.ndarray] = None,
               segment_ids: Optional[jnp.ndarray] = None, train: bool = False,
               return_layers: bool = False, return_attention: bool = False,
               mask: Optional[jnp.ndarray] = None, mask_token: Optional[jnp.ndarray] = None):
    x = self._embed(images, keep_ids, mask, mask_token)
    segments = self._segment_terms(segment_ids, keep_ids)
    x, out = self._blocks(x, segments, train=train, return_layers=return_layers,
                          return_attention=return_attention)
    x = nn.LayerNorm(epsilon=1e-6, dtype=DTYPES[self.config.get('dtype', 'float32')],
                     name='norm')(x)
    return x, {k: v for k, v in out._asdict().items() if v}

  def _embed(self, images, keep_ids, mask, mask_token) -> jnp.ndarray:
    """Patch embedding (masked patches → mask token), pos-embed (resized to the image's grid),
    gather of the visible patches, then the prefix tokens: (B, k + n, D)."""
    cfg = self.config
    dims = model_dims(cfg)
    dtype = DTYPES[cfg.get('dtype', 'float32')]
    width, p = dims['width'], dims['patch_size']
    x = PatchEmbed(width, p, dtype=dtype, name='patch_embed')(images.astype(dtype))
    if (mask is None) != (mask_token is None):
      raise ValueError('ViT: pass `mask` and `mask_token` together')
    if mask is not None:
      w = mask[..., None].astype(dtype)
      x = x * (1 - w) + mask_token.astype(dtype) * w
    prefix = num_prefix_tokens(cfg)
    pos = self._pos_embed(width, p, prefix, grid=int(round(x.shape[1] ** 0.5)))
    x = x + pos[:, prefix:].astype(dtype)
    if keep_ids is not None:
      x = jnp.take_along_axis(x, keep_ids[..., None], axis=1)
    tokens = []
    if prefix >= 1:
      tokens.append(self.param('cls_token', nn.initializers.normal(0.02), (1, 1, width)))
    if prefix >= 2:
      tokens.append(self.param('reg_token', nn.initializers.normal(0.02), (1, prefix - 1, width)))
    if tokens:
      cls = (jnp.concatenate(tokens, axis=1) + pos[:, :prefix]).astype(dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], prefix, width)), x], axis=1)
    return x

  def _pos_embed(self, width: int, patch: int, prefix: int, grid: int) -> jnp.ndarray:
    """`pos_embed` (1, prefix + grid², D): sincos (MAE) or learned init, frozen per
    `pos_embed_frozen`, resized to this image's grid."""
    cfg = self.config
    if cfg.get('pos_embed', 'sincos') == 'sincos':
      init = lambda *_: jnp.asarray(np.concatenate(
          [np.zeros((prefix, width), np.float32),
           sincos_pos_embed_2d(width, cfg.image_size // patch)]))[None]
      pos = self.param('pos_embed', init)
    else:
      pos = self.param('pos_embed', nn.initializers.normal(0.02),
                       (1, prefix + (cfg.image_size // patch) ** 2, width))
    if pos_embed_frozen(cfg):
      pos = jax.lax.stop_gradient(pos)
    return resize_pos_embed(pos, prefix, grid)

  def _segment_terms(self, segment_ids, keep_ids) -> Optional[SegmentTerms]:
    """MRE: every layer's `SegmentTerms` for the visible tokens (prefix tokens count as
    background), or None. The `segment_bias` params exist whenever the config enables it."""
    seg_cfg = self.config.get('segment_bias')
    if seg_cfg is None or not seg_cfg.enabled:
      return None
    ids = None
    if segment_ids is not None:  # patch ids (B, N) in original order → visible ids
      ids = segment_ids.astype(jnp.int32)
      if keep_ids is not None:
        ids = jnp.take_along_axis(ids, keep_ids, axis=1)
      prefix = num_prefix_tokens(self.config)
      ids = jnp.concatenate([jnp.zeros((ids.shape[0], prefix), jnp.int32), ids], axis=1)
    dims = model_dims(self.config)
    return segment_bias_lib.SegmentBias(seg_cfg, dims['depth'], dims['num_heads'],
                                        name='segment_bias')(ids)

  def _blocks(self, x, segments: Optional[SegmentTerms], *, train: bool, return_layers: bool,
              return_attention: bool) -> tuple[jnp.ndarray, LayerOutputs]:
    """The encoder blocks (`model.scan_layers`: one scanned stack), each with its row of the
    MRE tables and its drop-path rate."""
    cfg = self.config
    dims = model_dims(cfg)
    depth = dims['depth']
    ids = None if segments is None else segments.ids
    per_layer = {'u': None if segments is None else (segments.u_pos, segments.u_neg),
                 'drop': drop_paths(self, depth, cfg.get('drop_path', 0.0), train)}

    def step(block, x, row):
      terms = None if row['u'] is None else SegmentTerms(ids, *row['u'])
      return block(x, None, terms, row['drop'])
    return block_stack(x, per_layer, step, depth=depth, scan=cfg.get('scan_layers', False),
                       make_block=block_factory(cfg, num_heads=dims['num_heads'],
                                                mlp_dim=dims['mlp_dim'],
                                                return_attention=return_attention),
                       return_layers=return_layers, return_attention=return_attention)


def pos_embed_frozen(config: ml_collections.ConfigDict) -> bool:
  """Whether the forward stops gradients through `pos_embed`: `model.freeze_pos_embed`, by
  default True for the fixed sincos table (MAE pretraining: requires_grad=False) and False for
  a learned one. Fine-tuning sets it False: MAE trains the loaded table (configs/eval/finetune.py)."""
  frozen = config.get('freeze_pos_embed')
  return config.get('pos_embed', 'sincos') == 'sincos' if frozen is None else bool(frozen)


def num_prefix_tokens(config: ml_collections.ConfigDict) -> int:
  """`config.num_prefix_tokens` (cls + proxy/register tokens), default 1."""
  n = config.get('num_prefix_tokens', 1)
  if not isinstance(n, int) or n < 0:
    raise ValueError(f'model.num_prefix_tokens={n!r}: expected an int >= 0')
  return n


def pool_tokens(tokens: jnp.ndarray, pool: str, num_prefix: int = 1) -> jnp.ndarray:
  """'cls' → tokens[:, 0] (mean of the prefix tokens when there are several, as SemanticMIM
  reads its proxies); 'mean' → mean over patch tokens (prefix tokens excluded)."""
  if pool == 'cls':
    return tokens[:, 0] if num_prefix == 1 else tokens[:, :num_prefix].mean(axis=1)
  if pool == 'mean':
    return tokens[:, num_prefix:].mean(axis=1)
  raise ValueError(f'model.pool={pool!r}: expected "cls" or "mean"')
