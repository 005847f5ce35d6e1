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


@pytest.fixture(scope='module')
def jpeg_data(tmp_path_factory):
  """8 benchmark JPEGs (bench --make_jpegs's writer) built as an image_folder data set."""
  from mimjax.data import build
  from mimjax.data.builders import embedded
  root = tmp_path_factory.mktemp('jpegs')
  assert embedded.write_photo_jpegs(str(root / 'src'), count=8) == 8
  assert build.main(['image_folder', '--source', str(root / 'src'), '--data_dir',
                     str(root / 'data'), '--resize_shorter', '64', '--num_workers', '0']) == 0
  return str(root / 'data')


def _dino_data(data_dir):
  from configs import dino as dino_config
  config = dino_config.get_config('tiny')
  config.data.name, config.data.data_dir = 'image_folder', data_dir
  config.batch_size = 4
  return config


def test_data_bench_cpu_time_cores_and_the_official_pipeline(jpeg_data):
  """--data: CPU ms per image per round, cores per accelerator = ms × rate / 1000, and the
  official DataAugmentationDINO on the same records (2 + n uint8 views per image)."""
  from mimjax import bench_torch
  config = _dino_data(jpeg_data)
  result = bench.bench_data(config, steps=1, rounds=2, accelerator_img_per_s=1000.0,
                            torch_reference=True)
  assert result['device_photometric'] and result['augment_on'] == 'device'
  assert len(result['cpu_ms_per_img_rounds']) == 2 and result['cpu_ms_per_img'] > 0
  assert result['host_cores_per_accelerator'] == pytest.approx(result['cpu_ms_per_img'], abs=0.1)
  assert result['torch']['pipeline'] == 'DataAugmentationDINO'
  assert result['torch']['cpu_ms_per_img'] > 0
  views = bench_torch.official_transform(config.data)(
      __import__('PIL.Image').Image.new('RGB', (80, 60)))
  assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
  assert all(str(v.dtype) == 'torch.uint8' for v in views)
  config.data.augment = 'simple'
  with pytest.raises(ValueError, match="no official pipeline for data.augment='simple'"):
    bench.bench_data(config, 1, 1, 1000.0, torch_reference=True)


@pytest.mark.slow  # compiles a DINO step (~20 s on 2 loaded cores); test_scale compiles it too
def test_bench_step_reports_the_device_augmentation_share():
  from configs import dino as dino_config
  config = dino_config.get_config('tiny')
  config.batch_size = 8
  result = bench.bench_step(config, steps=1, warmup=0)
  assert result['device_augment'] == 'dino'
  # tiny DINO at 32 px: the augmentation is a few % of a 2-block ViT's step (large models: less)
  assert 0 < result['augment_flops_share'] < 0.2
