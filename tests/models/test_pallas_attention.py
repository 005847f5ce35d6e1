"""Pallas flash attention with the in-kernel MRE bias (interpret mode on CPU).

Values and gradients (q, k, v, u_pos, u_neg) against a plain softmax written here with the bias
built pair by pair; every MRE mode and sign through the ViT against the einsum path; a
bfloat16 bound; one MRE-MAE train step against the einsum step; GPU/TPU lowering from CPU;
the TPU kernels (their layout and 128-row tiles) in interpret mode;
the kernel under a mesh (shard_map over the batch axes, backend from the mesh's platform);
unknown attention names refused.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import mre_mae as mre_mae_config
from mimjax import bench
from mimjax import optim
from mimjax import sharding
from mimjax.data import pipeline
from mimjax.models import pallas_attention as pa
from mimjax.models import segment_bias
from mimjax.models.attention import Attention, fused_backend
from mimjax.models.segment_bias import SegmentTerms
from mimjax.models.vit import ViT
from mimjax.objectives import mae
from mimjax.train import trainer
from mimjax.validate import validate_config
from tests import hlo
from tests.hlo import needs_libtpu, tpu_mesh

F32_TOL = 1e-5
LR = 1e-3  # the train-step check's learning rate
# bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8. Both bf16 paths round P, dO and
# the output once each (the kernel rounds the running, unnormalised P; the einsum path the
# normalised P), so each sits about u/2..u from the float32 result on the same rounded inputs
# (relative L2, measured ≤ 0.0036 at T = 50 and 197); 2u = 2^-7 bounds O, dq, dk, dv with a
# ×2 margin, and the einsum path is checked against the same bound. d u is a sum of dS terms
# that nearly cancel (each row of dS sums to 0), so its relative error is the terms' (~u)
# times the cancellation ratio; the kernel also forms delta = Σ dO·O from the bf16 O, as
# FlashAttention-2 does. Measured: 2.7 % (kernel) and 1.8 % (einsum) at T = 50; bound 2^-4.
BF16_TOL = 2.0 ** -7
BF16_DU_TOL = 2.0 ** -4


def reference(q, k, v, ids, u_pos, u_neg, scale):
  """softmax((q·kᵀ + b)·scale)·v; b from ids: same & known → u_pos, different → u_neg, else 0."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  if ids is not None:
    a, b = ids[:, None, :, None], ids[:, None, None, :]
    known = (a != 0) & (b != 0)
    head = lambda u: u[None, :, None, None]
    logits = logits + jnp.where(known & (a == b), head(u_pos),
                                jnp.where(known, head(u_neg), 0.0))
  probs = jax.nn.softmax(logits * scale, axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


# One program per input set instead of one per random primitive (eagerly, each compiles on its
# own for every new shape). The kernels themselves are compiled, not interpreted op by op:
# lowering + compiling is ~2.5 s of a (value, grads) call, running it ~0.06 s.
@functools.partial(jax.jit, static_argnums=range(7))
def _inputs(b, t, h, d, s=None, seed=0, num_ids=5):
  """Random q (B, T, H, D), k/v (B, S, H, D), cotangent, ids (cls = 0) and u scalars."""
  s = s or t
  ks = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(ks[0], (b, t, h, d))
  k, v = (jax.random.normal(kk, (b, s, h, d)) for kk in ks[1:3])
  cot = jax.random.normal(ks[3], (b, t, h, d))
  ids = jax.random.randint(ks[4], (b, t), 0, num_ids).at[:, 0].set(0)
  return q, k, v, cot, ids, jax.random.normal(ks[5], (h,)), jax.random.normal(ks[6], (h,))


def _value_and_grads(fn, q, k, v, cot, u_pos, u_neg):
  """Σ out·cot and its gradients in (q, k, v, u_pos, u_neg), float32 for comparison."""
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot)
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=range(5)))(q, k, v, u_pos, u_neg)
  return [value] + list(grads)


def _assert_close(got, want, tol):
  for name, a, b in zip(('value', 'dq', 'dk', 'dv', 'du_pos', 'du_neg'), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
    assert err <= tol, f'{name}: max error {err:.2e} > {tol:.0e}'


@pytest.mark.parametrize('t,bias,blocks', [
    (50, True, None),       # MAE-B/16 visible tokens: one 64-token tile, 14 padded keys
    (197, True, None),      # full 14×14 grid + cls: two 128-token tiles, 59 padded
    pytest.param(50, True, (16, 16), marks=pytest.mark.slow),    # four tiles per axis
    pytest.param(13, False, None, marks=pytest.mark.slow),       # odd, no bias, one tile
])
def test_kernel_matches_reference_values_and_gradients(t, bias, blocks):
  q, k, v, cot, ids, u_pos, u_neg = _inputs(2, t, 3, 16, None, t)
  scale = 16 ** -0.5
  block_q, block_k = blocks or (None, None)
  kernel = lambda q, k, v, up, un: pa.flash_attention(
      q, k, v, scale=scale, segments=SegmentTerms(ids, up, un) if bias else None,
      block_q=block_q, block_k=block_k)
  ref = lambda q, k, v, up, un: reference(q, k, v, ids if bias else None, up, un, scale)
  got = _value_and_grads(kernel, q, k, v, cot, u_pos, u_neg)
  want = _value_and_grads(ref, q, k, v, cot, u_pos, u_neg)
  _assert_close(got, want, F32_TOL)
  if bias:  # the bias gradients are real reductions, not zeros that match trivially
    assert float(jnp.abs(got[4]).min()) > 1e-4 and float(jnp.abs(got[5]).min()) > 1e-4


def test_plain_cross_attention_with_other_key_length():
  # no bias (plain flash attention, as MAE's decoder gets it); proxy-style cross-attention:
  # 13 queries over 50 keys in 16-token tiles, both axes padded, online softmax over 4 tiles
  q, k, v, cot, _, u_pos, u_neg = _inputs(2, 13, 2, 16, 50, 1)
  kernel = lambda q, k, v, *_: pa.flash_attention(q, k, v, scale=0.25, block_q=16, block_k=16)
  ref = lambda q, k, v, up, un: reference(q, k, v, None, up, un, 0.25)
  got = _value_and_grads(kernel, q, k, v, cot, u_pos, u_neg)
  _assert_close(got[:4], _value_and_grads(ref, q, k, v, cot, u_pos, u_neg)[:4], F32_TOL)


@pytest.mark.parametrize('blocks', [
    # each kernel tiles its own way (the key ids are re-tiled per kernel): forward 64×64,
    # dQ 64 rows × 16 keys, dK/dV 16 rows × 32 keys
    pa.BlockSizes(pa.Tiles(64, 64), pa.Tiles(64, 16), pa.Tiles(16, 32)),
    pytest.param(pa.default_blocks(50, 50, 32, 'gpu'), marks=pytest.mark.slow),  # GPU's tiles
])
def test_own_tiles_per_kernel_and_head_dim_padded_to_a_power_of_two(blocks):
  # D = 20 runs as 32 (zero columns, dropped from the output), as ViT-H/14's 80 runs as 128
  q, k, v, cot, ids, u_pos, u_neg = _inputs(2, 50, 2, 20, None, 4)
  assert pa.kernel_head_dim(20, 'cpu') == 32 and pa.kernel_head_dim(80, 'gpu') == 128
  kernel = lambda q, k, v, up, un: pa.flash_attention(
      q, k, v, scale=0.25, segments=SegmentTerms(ids, up, un), blocks=blocks)
  ref = lambda q, k, v, up, un: reference(q, k, v, ids, up, un, 0.25)
  _assert_close(_value_and_grads(kernel, q, k, v, cot, u_pos, u_neg),
                _value_and_grads(ref, q, k, v, cot, u_pos, u_neg), F32_TOL)


def test_tiles_must_be_powers_of_two():
  with pytest.raises(ValueError, match='powers of two ≥ 16'):
    pa.Tiles(48, 64)
  with pytest.raises(ValueError, match='powers of two ≥ 16'):
    pa.Tiles(64, 8)


@pytest.mark.parametrize('t,s,bias', [
    (50, None, True),    # one 128-row block over 50 rows: the block runs past the array's end
    pytest.param(130, None, True, marks=pytest.mark.slow),   # two tiles per axis, 126 past
    pytest.param(13, 50, False, marks=pytest.mark.slow),     # cross-attention, no bias
])
def test_tpu_kernels_in_interpret_mode_match_reference(t, s, bias):
  # The TPU layout and tiles ((B, T, H·D) blocks with every head, 128-row tiles, no padding
  # of q/k/v) run in interpret mode, which fills what lies past an array's end with NaN: any
  # row the kernels failed to mask would turn a value or a gradient into NaN.
  q, k, v, cot, ids, u_pos, u_neg = _inputs(2, t, 2, 16, s, 6)
  kernel = lambda q, k, v, up, un: pa.flash_attention(
      q, k, v, scale=0.25, segments=SegmentTerms(ids, up, un) if bias else None,
      backend='tpu', interpret=True)
  ref = lambda q, k, v, up, un: reference(q, k, v, ids if bias else None, up, un, 0.25)
  n = 6 if bias else 4   # without the bias, u gets no gradient
  _assert_close(_value_and_grads(kernel, q, k, v, cot, u_pos, u_neg)[:n],
                _value_and_grads(ref, q, k, v, cot, u_pos, u_neg)[:n], F32_TOL)


def test_tpu_tiles_are_multiples_of_128():
  assert pa.default_blocks(37, 37, 64, 'tpu') == pa.BlockSizes.uniform(128, 128)
  q = jnp.zeros((1, 50, 2, 16))
  with pytest.raises(ValueError, match='TPU tiles must be multiples of 128'):
    pa.flash_attention(q, q, q, scale=0.25, block_q=64, backend='tpu', interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize('t', [785, 301])   # B/8 at 224 px: 7 tiles per axis; 3 tiles, odd
def test_long_sequences(t):
  q, k, v, cot, ids, u_pos, u_neg = _inputs(1, t, 1, 16, None, t)
  kernel = lambda q, k, v, up, un: pa.flash_attention(q, k, v, scale=0.25,
                                                      segments=SegmentTerms(ids, up, un))
  ref = lambda q, k, v, up, un: reference(q, k, v, ids, up, un, 0.25)
  _assert_close(_value_and_grads(kernel, q, k, v, cot, u_pos, u_neg),
                _value_and_grads(ref, q, k, v, cot, u_pos, u_neg), F32_TOL)


def test_bfloat16_within_two_ulp_of_float32():
  q, k, v, cot, ids, u_pos, u_neg = _inputs(2, 50, 2, 64, None, 5)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  scale = 64 ** -0.5
  kernel = lambda q, k, v, up, un: pa.flash_attention(q, k, v, scale=scale,
                                                      segments=SegmentTerms(ids, up, un))
  ref = lambda q, k, v, up, un: reference(q, k, v, ids, up, un, scale)
  truth = _value_and_grads(ref, *(x.astype(jnp.float32) for x in (q, k, v)), cot, u_pos, u_neg)
  rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
  out = lambda fn, *a: jax.jit(fn)(*a, u_pos, u_neg)
  want = out(ref, *(x.astype(jnp.float32) for x in (q, k, v)))
  assert out(kernel, q, k, v).dtype == jnp.bfloat16
  assert rel(out(kernel, q, k, v), want) <= BF16_TOL
  assert rel(out(ref, q, k, v), want) <= BF16_TOL   # the einsum path meets the same bound
  got = _value_and_grads(kernel, q, k, v, cot, u_pos, u_neg)
  einsum = _value_and_grads(ref, q, k, v, cot, u_pos, u_neg)
  for name, a, e, b in zip(('dq', 'dk', 'dv', 'du_pos', 'du_neg'), got[1:], einsum[1:],
                           truth[1:]):
    bound = BF16_DU_TOL if name.startswith('du') else BF16_TOL
    assert rel(a, b) <= bound and rel(e, b) <= bound, (name, rel(a, b), rel(e, b))


@pytest.mark.parametrize('mode', segment_bias.MODES)
@pytest.mark.parametrize('sign', segment_bias.SIGNS)
def test_factored_terms_are_the_dense_bias_in_every_mode(mode, sign):
  # What the kernel receives per layer (ids + per-head scalars) is the dense bias the einsum
  # path adds, for every mode and sign; a dropped sign is a constant 0, not a parameter.
  ids = jnp.array([[0, 1, 1, 2, 0, 3], [0, 2, 2, 2, 1, 0]])
  cfg = segment_bias.default_config()
  cfg.update(enabled=True, mode=mode, sign=sign)
  mod = segment_bias.SegmentBias(cfg, depth=3, num_heads=2)
  params = mod.init(jax.random.key(0), ids)
  params = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  table = lambda name, on: (np.zeros((3, 2)) if not on else np.broadcast_to(
      params['params'][name] if mode != 'fixed' else
      cfg.fixed_value * (1 if name == 'u_pos' else -1), (3, 2)))
  u_pos = table('u_pos', sign in ('both', 'positive'))
  u_neg = table('u_neg', sign in ('both', 'negative'))
  rel = segment_bias.relations(ids)
  terms = mod.apply(params, ids)
  for layer in range(3):
    got = terms.layer(layer)
    assert isinstance(got, SegmentTerms) and got.u_pos.shape == (2,)
    want = (np.asarray(rel.positive)[:, None] * u_pos[layer][None, :, None, None]
            + np.asarray(rel.negative)[:, None] * u_neg[layer][None, :, None, None])
    np.testing.assert_array_equal(got.dense(), want.astype(np.float32))


def _vit(attention, mode, sign):
  seg = segment_bias.default_config()
  seg.update(enabled=True, mode=mode, sign=sign, init_pos=0.7, init_neg=-0.4, fixed_value=0.9)
  return ViT(ml_collections.ConfigDict({'variant': 'mu/4', 'image_size': 32,
                                        'attention': attention, 'segment_bias': seg}))


def _assert_grads_close(got, want) -> None:
  """Leaf by leaf: rtol 1e-4, and float32 round-off relative to the leaf's largest entry."""
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
    np.testing.assert_allclose(g, flat_want[path], rtol=1e-4, atol=F32_TOL * float(
        jnp.abs(flat_want[path]).max()), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('mode,sign', [
    ('layer_head', 'both'), ('shared', 'positive'),
    pytest.param('head', 'negative', marks=pytest.mark.slow),
    pytest.param('fixed', 'both', marks=pytest.mark.slow),
])
def test_every_mre_mode_equals_einsum_path(mode, sign):
  # MAE-style input: 1 cls + 25 of 64 patches visible → 26 tokens in one 32-token tile
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  ids = jax.random.randint(jax.random.key(1), (2, 64), 0, 5)
  keep = jnp.argsort(jax.random.uniform(jax.random.key(2), (2, 64)), axis=1)[:, :25]
  einsum, kernel = _vit('xla', mode, sign), _vit('pallas', mode, sign)
  params = jax.jit(lambda r: einsum.init(r, images, keep_ids=keep, segment_ids=ids))(
      jax.random.key(3))  # one program, not one per primitive
  cot = jax.random.normal(jax.random.key(4), (2, 26, 64))

  def value_and_grads(model):
    loss = lambda p: jnp.sum(model.apply(p, images, keep_ids=keep, segment_ids=ids)[0] * cot)
    return jax.jit(jax.value_and_grad(loss))(params)

  (v_ref, g_ref), (v_got, g_got) = value_and_grads(einsum), value_and_grads(kernel)
  np.testing.assert_allclose(v_got, v_ref, rtol=F32_TOL)
  _assert_grads_close(g_got, g_ref)
  if mode != 'fixed':  # u receives gradient only where its sign is on
    seg = g_got['params']['segment_bias']
    assert (float(jnp.abs(seg['u_pos']).max()) > 0) == (sign != 'negative')
    assert (float(jnp.abs(seg['u_neg']).max()) > 0) == (sign != 'positive')


@pytest.mark.slow   # ~40 s alone, minutes on a loaded box (interpret mode in 4 + 1 blocks)
def test_mre_mae_train_step_equals_einsum_step():
  # configs/mre_mae.py:tiny (encoder with the bias, decoder without) through the trainer's
  # step: its loss, the objective's gradients, and the step moving the bias tables.
  # The AdamW-updated params are not compared: Adam's first step lr·g/(|g| + eps) turns the
  # round-off of a weight whose gradient is ~eps (a sum of cancelling terms) into a step
  # difference of ~lr·(relative round-off), which equal gradients already rule out as a bug.
  batch = {'image': np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8),
           'segments': np.random.default_rng(1).integers(0, 6, (4, 32, 32), np.uint8)}
  # What the loader ships to an MRE model: per-patch ids, not the raw maps.
  batch = pipeline.to_patch_ids(batch, mre_mae_config.get_config('tiny').data)
  results = []
  for attention in ('xla', 'pallas'):
    config = mre_mae_config.get_config('tiny')
    config.model.attention = attention
    config.model.segment_bias.init_pos, config.model.segment_bias.init_neg = 0.5, -0.5
    config.optim.lr = LR   # no warm-up: the one step moves every trained parameter by ~LR
    objective = mae.make(config)
    params_shape = jax.eval_shape(lambda r: objective.init(r, batch)[0], jax.random.key(0))
    tx, lr = optim.make_optimizer(config.optim, params_shape, total_steps=10, warmup_steps=0,
                                  batch_size=4, num_examples=4)
    state = trainer.init_train_state(objective, tx, jax.random.key(0), batch)
    grads = jax.jit(jax.grad(lambda p: objective.loss(p, state['state'], batch,
                                                      jax.random.key(1), 0)[0]))(state['params'])
    results.append((jax.jit(trainer.make_train_step(objective, tx, lr))(state, batch), grads))
  ((s_ref, m_ref), g_ref), ((s_got, m_got), g_got) = results
  np.testing.assert_allclose(m_got['loss'], m_ref['loss'], rtol=F32_TOL)
  _assert_grads_close(g_got, g_ref)
  for name, init in (('u_pos', 0.5), ('u_neg', -0.5)):
    moved = s_got['params']['encoder']['segment_bias'][name] - init
    assert float(jnp.abs(moved).min()) > LR / 2, name   # the kernel's du reached the step


@pytest.mark.parametrize('platform,backend,call', [
    ('cuda', 'gpu', '__gpu$xla.gpu.triton'), ('tpu', 'tpu', 'tpu_custom_call')])
def test_lowers_for_gpu_triton_and_tpu_mosaic(platform, backend, call):
  # Lowering only (Triton IR / Mosaic MLIR built on this CPU host): the GPU/TPU compilers and
  # the kernels' execution on hardware are not exercised here.
  b, t, h, d = 2, 197, 12, 64
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  ids, u = jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((h,), jnp.float32)
  loss = lambda q, k, v, ids, up, un: jnp.sum(pa.flash_attention(
      q, k, v, scale=d ** -0.5, segments=SegmentTerms(ids, up, un), backend=backend))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4, 5)))
  text = grad.trace(q, q, q, ids, u, u).lower(lowering_platforms=(platform,)).as_text()
  assert text.count(call) == 3   # forward, dQ (+ du), dK/dV kernels
  if backend == 'tpu':  # q, k, v, O enter as (B, T, H·D): reshapes, no transposes or pads
    assert 'stablehlo.transpose' not in text
    pads = [line for line in text.splitlines() if 'stablehlo.pad' in line]
    assert pads and all('xi32>' in line for line in pads)   # only the (B, T) ids pad


def test_unknown_attention_name_is_refused_everywhere():
  config = mre_mae_config.get_config('tiny')
  config.model.attention = 'bogus'
  with pytest.raises(ValueError, match=r"config.model.attention='bogus'"):
    validate_config(config)
  with pytest.raises(ValueError, match=r"model.attention='bogus'"):
    Attention(2, implementation='bogus').init(jax.random.key(0), jnp.zeros((1, 4, 8)))
  config.model.attention = 'pallas'
  validate_config(config)
  assert bench.attention_backend(config.model) == 'pallas'


@pytest.mark.parametrize('devices', [1, 8])
def test_kernel_under_a_mesh_runs_per_device_with_the_same_numbers(devices):
  # Under a mesh the kernel runs inside shard_map, each device on its own rows of the batch;
  # the u gradients are per-device sums that the shard_map's transpose adds up.
  q, k, v, cot, ids, u_pos, u_neg = _inputs(8, 50, 3, 16, None, 2)
  kernel = lambda q, k, v, up, un: pa.flash_attention(q, k, v, scale=0.25,
                                                      segments=SegmentTerms(ids, up, un))
  ref = lambda q, k, v, up, un: reference(q, k, v, ids, up, un, 0.25)
  with jax.set_mesh(hlo.mesh_of(devices)):
    got = _value_and_grads(kernel, q, k, v, cot, u_pos, u_neg)
    loss = lambda *a: jnp.sum(kernel(*a) * cot)
    compiled = jax.jit(jax.grad(loss, argnums=range(5))).lower(q, k, v, u_pos, u_neg).compile()
  _assert_close(got, _value_and_grads(ref, q, k, v, cot, u_pos, u_neg), F32_TOL)
  assert hlo.all_gather_sizes(compiled) == []   # no device sees another's rows


def test_batch_that_does_not_divide_over_the_mesh_is_replicated():
  # e.g. the batch of one an init traces: every device runs the whole call
  q, k, v, cot, ids, u_pos, u_neg = _inputs(3, 13, 2, 16, None, 3)
  with jax.set_mesh(hlo.mesh_of(8)):
    got = jax.jit(lambda q, k, v: pa.flash_attention(q, k, v, scale=0.25))(q, k, v)
  np.testing.assert_allclose(got, reference(q, k, v, None, u_pos, u_neg, 0.25), atol=F32_TOL)


def test_kernel_batch_axes_are_the_meshs():
  assert pa.BATCH_AXES == sharding.BATCH_AXES


def test_kernels_follow_the_platform_of_the_mesh():
  # A CPU host tracing for a GPU mesh picks cuDNN for 'fused' and Triton for 'pallas';
  # without a mesh, jax's default backend (CPU here: XLA, interpret mode).
  gpu = jax.sharding.AbstractMesh((2,), ('data',), abstract_device=jax.sharding.AbstractDevice(
      device_kind='NVIDIA H100', num_cores=None, platform='gpu'))
  with jax.sharding.use_abstract_mesh(gpu):
    assert pa.platform() == 'gpu' and fused_backend(jnp.bfloat16, 64) == 'cudnn'
  assert pa.platform() == jax.default_backend()
  assert fused_backend(jnp.bfloat16, 64) == ('cudnn' if jax.default_backend() == 'gpu'
                                             else 'xla')


@needs_libtpu
def test_tpu_mesh_gets_mosaic_kernels_without_naming_the_backend():
  # No backend= : the mesh of TPU topology devices (compile-only, on this CPU host) decides.
  mesh = tpu_mesh(4)
  b, t, h, d = 8, 197, 4, 64
  spec = lambda shape, dtype: hlo.abstract(shape, dtype, mesh, P(sharding.BATCH_AXES))
  q = spec((b, t, h, d), jnp.bfloat16)
  ids, u = spec((b, t), jnp.int32), hlo.abstract((h,), jnp.float32, mesh)

  def loss(q, k, v, ids, up, un):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return jnp.sum(pa.flash_attention(q, k, v, scale=d ** -0.5,
                                        segments=SegmentTerms(ids, up, un)))

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4, 5))).trace(
      q, q, q, ids, u, u).lower().as_text()
  assert text.count('tpu_custom_call') == 3   # forward, dQ (+ du), dK/dV kernels
