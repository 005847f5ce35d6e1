"""The benchmark harness runs the real train step and reports sane numbers."""

import numpy as np
import pytest

from configs import mae as mae_config
from mimjax import bench


def test_synthetic_batch_keeps_shapes_and_dtypes():
  example = {'image': np.zeros((1, 8, 8, 3), np.uint8), 'label': np.zeros((1,), np.int32)}
  batch = bench.synthetic_batch(example, 4)
  assert batch['image'].shape == (4, 8, 8, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (4,)


def _jax_param_count(config) -> int:
  import jax
  import numpy as np
  from mimjax.objectives import mae
  size = config.model.image_size
  shapes = jax.eval_shape(
      lambda r: mae.make(config).init(r, {'image': np.zeros((1, size, size, 3), np.uint8)})[0],
      jax.random.key(0))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_torch_mae_param_count_equals_ours():
  import torch
  from mimjax import bench_torch
  for arg in ('tiny', 'vit_b'):
    config = mae_config.get_config(arg)
    with torch.device('meta'):  # shapes only: no 112M-parameter allocation
      model = bench_torch.from_config(config)
    assert bench_torch.param_count(model) == _jax_param_count(config), arg
  # MAE ViT-B/16 + 8×512 decoder, frozen pos-embeds included: the official model's size.
  assert _jax_param_count(mae_config.get_config('vit_b')) == 111_907_840


def test_torch_mae_loss_equals_ours_on_converted_weights():
  """Same weights (via mimjax.convert's MAE format), images and noise → same loss."""
  import jax
  import numpy as np
  import torch
  from mimjax import bench_torch, masking
  from mimjax.convert import to_torch
  from mimjax.data.normalize import normalize_images
  from mimjax.objectives import mae
  config = mae_config.get_config('tiny')
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  # init and the loss each one compiled program (eagerly every primitive compiles on its own)
  params, _ = jax.jit(mae.make(config).init)(jax.random.key(0), {'image': images[:1]})
  noise = np.random.default_rng(1).random((3, 64)).astype(np.float32)
  x = normalize_images(images)

  @jax.jit
  def loss(params, x, noise):
    m = masking.random_masking_from_noise(noise, config.mask_ratio)
    pred = mae.MAE(config).apply({'params': params}, x, m.keep_ids, m.restore_ids)
    return mae.mae_loss(pred, x, m.mask, norm_pix=True)
  want = float(loss(params, x, noise))

  model = bench_torch.from_config(config)
  state = {k: torch.from_numpy(np.array(v)) for k, v in
           to_torch.mae_to_torch(jax.device_get(params), config).items()}
  model.load_state_dict(state, strict=True)
  with torch.no_grad():
    got = float(model(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(),
                      config.mask_ratio, torch.from_numpy(noise)))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bench_step_and_torch_side_by_side_on_cpu():
  """One JAX compile serves both: the step's own figures and the ratio to PyTorch eager."""
  config = mae_config.get_config('tiny')
  config.batch_size = 16
  result = bench.compare_with_torch(config, steps=2, warmup=1, mode='eager', torch_threads=1)
  assert result['img_per_s'] > 0 and result['step_ms'] > 0
  # mu/4 at 32 px: forward+backward of ~0.1M params × 16 visible tokens is O(10 MFLOP)/img.
  assert 1e-3 < result['gflops_per_img'] < 1.0
  assert 0 < result['mfu'] < 1
  assert result['final_loss'] > 0 and result['attention_backend'] == 'einsum'
  t = result['torch']
  assert t['device'] == 'cpu' and t['autocast'] == 'float32' and t['batch_size'] == 16
  assert t['threads'] == 1
  assert t['img_per_s'] > 0 and np.isfinite(t['final_loss']) and t['final_loss'] > 0
  assert t['params'] == _jax_param_count(config)
  assert result['jax_over_torch'] == pytest.approx(result['img_per_s'] / t['img_per_s'],
                                                   rel=1e-2)


def test_torch_mode_rejects_non_mae_objectives():
  from configs import lut as lut_config
  from mimjax import bench_torch
  with pytest.raises(ValueError, match='config.objective'):
    bench_torch.bench_torch(lut_config.get_config('tiny'), 1, 0)
  with pytest.raises(ValueError, match='eager'):
    bench_torch.bench_torch(mae_config.get_config('tiny'), 1, 0, mode='jit')


def test_synthetic_segments_follow_every_image_key():
  example = {'image': np.zeros((1, 2, 8, 8, 3), np.uint8), 'label': np.zeros((1,), np.int32),
             'global': np.zeros((1, 2, 16, 16, 3), np.uint8),
             'local': np.zeros((1, 4, 8, 8, 3), np.uint8)}
  out = bench.add_synthetic_segments(example, num_ids=5)
  assert out['segments'].shape == (1, 2, 8, 8)
  assert out['segments_global'].shape == (1, 2, 16, 16)
  assert out['segments_local'].shape == (1, 4, 8, 8)
  assert out['segments'].dtype == np.uint8 and out['segments'].max() < 5
  assert 'segments' not in bench.add_synthetic_segments(
      {'label': example['label']}, num_ids=5)


def test_bench_step_runs_mre_mae_on_synthetic_segments():
  from configs import mre_mae as mre_config
  config = mre_config.get_config('tiny')
  config.batch_size = 8
  assert bench.needs_segments(config)
  result = bench.bench_step(config, steps=1, warmup=0)  # fails without `segments` in the batch
  assert result['img_per_s'] > 0 and result['gflops_per_img'] > 0
