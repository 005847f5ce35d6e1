"""The benchmark harness runs the real train step and reports sane numbers."""

import pathlib

import numpy as np
import pytest

from configs import mae as mae_config
from mimjax import bench

REPO = str(pathlib.Path(__file__).resolve().parents[1])


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


def test_a_scanned_step_is_benched_with_the_unrolled_steps_flops():
  # The compiled scan's cost analysis counts its body once; GFLOPs/img and MFU use the
  # unrolled step's FLOPs (lowering vs compiled program: within 3 %, tests/test_scale.py).
  results = []
  for scan in (False, True):
    config = mae_config.get_config('tiny')
    config.batch_size, config.model.scan_layers = 16, scan
    results.append(bench.bench_step(config, steps=1, warmup=0))
  # gflops_per_img is rounded to 3 decimals: ±0.0005 each (a 24 % undercount is 0.005 here).
  assert results[1]['gflops_per_img'] == pytest.approx(results[0]['gflops_per_img'], rel=0.03,
                                                       abs=1e-3)


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


# ------------------------------------------------------------------ the suite (--suite)
def _suite_options(**kw):
  from mimjax import bench_suite
  given = dict(rows=('mae',), attention_shapes=[(50, 2, 16, 'test')],
               kernel_dtypes=('float32',), batch_per_device=2, steps=1, warmup=0, torch=None)
  given.update(kw)
  return bench_suite.SuiteOptions.for_platform('cpu', **given)


def _run_suite(options, tmp_path, capsys):
  from mimjax import bench_suite
  out = tmp_path / 'suite.json'
  status = bench_suite.main(options, str(out))
  import json
  return status, json.loads(out.read_text()), capsys.readouterr().out


def test_suite_checks_kernels_and_times_a_row_on_cpu(tmp_path, capsys):
  """One MRE-MAE-B/16-length shape (2 heads of 16) in float32 and the MAE tiny row."""
  from mimjax import bench_suite
  status, report, stdout = _run_suite(_suite_options(), tmp_path, capsys)
  assert status == 0 and report['suite']['ok'] and report['suite']['platform'] == 'cpu'
  kernels = [r for r in report['records'] if r['kind'] == 'kernel']
  # pallas and fused, each with and without the MRE bias
  assert sorted((r['config']['attention'], r['config']['mre_bias']) for r in kernels) == [
      ('fused', False), ('fused', True), ('pallas', False), ('pallas', True)]
  for r in kernels:
    n = r['numbers']
    assert r['ok'] and r['shapes'] == {'batch': 2, 'tokens': 50, 'heads': 2, 'head_dim': 16,
                                       'where': 'test'}
    assert set(n['errors']) == set(bench_suite.QUANTITIES[:3 + 2 * r['config']['mre_bias']])
    assert n['max_err'] == max(n['errors'].values()) <= n['tolerance'] == 1e-5
    assert all(np.isfinite(t[k]) and t[k] > 0 for key in ('fwd', 'fwd_bwd', 'reference_fwd')
               for t in [n[key]] for k in ('ms', 'cpu_ms'))
  pallas = next(r for r in kernels if r['config'] == dict(
      attention='pallas', backend='pallas interpret', reference='xla', mre_bias=True,
      dtype='float32'))
  # the kernel is another computation than the einsum path: rounding differs, at float32 level
  assert 0 < pallas['numbers']['max_err'] < 1e-5
  (step,) = [r for r in report['records'] if r['kind'] == 'step']
  n = step['numbers']
  assert step['ok'] and step['name'] == 'mae' and step['config']['row'] == 'configs/mae.py:tiny'
  assert step['config']['batch_size'] == 2 * step['devices'] == step['shapes']['batch_size']
  assert all(np.isfinite(n[k]) and n[k] > 0 for k in ('compile_s', 'step_ms', 'step_cpu_ms',
                                                      'img_per_s', 'gflops_per_img'))
  assert np.isfinite(n['final_loss']) and 'torch' not in n
  assert 'pallas+mre 50x2x16 float32' in stdout and 'mae.py:tiny' in stdout
  assert f'{len(report["records"])}/{len(report["records"])} ok' in stdout


def test_suite_fails_when_a_kernel_is_off_by_more_than_its_tolerance(tmp_path, capsys,
                                                                     monkeypatch):
  """A Pallas kernel 0.1 % off (far above float32 rounding) fails its checks, and the suite's
  status with them; the fused path still passes."""
  from mimjax.models import pallas_attention
  right = pallas_attention.flash_attention
  monkeypatch.setattr(pallas_attention, 'flash_attention',
                      lambda *a, **kw: right(*a, **kw) * 1.001)
  status, report, stdout = _run_suite(_suite_options(rows=()), tmp_path, capsys)
  assert status == 1 and not report['suite']['ok']
  verdict = {r['config']['attention']: r['ok'] for r in report['records']}
  assert verdict == {'pallas': False, 'fused': True}
  for r in report['records']:
    if r['config']['attention'] == 'pallas':
      assert r['numbers']['errors']['out'] == pytest.approx(1e-3, rel=0.01)
  assert 'FAIL' in stdout


def test_suite_options_follow_the_platform_and_refuse_unknown_rows():
  from mimjax import bench_suite
  cpu = bench_suite.SuiteOptions.for_platform('cpu')
  assert cpu.tiny and cpu.rows == bench_suite.ROWS and cpu.batch_per_device is None
  assert cpu.attention_shapes == bench_suite.CPU_ATTENTION and 'float32' in cpu.kernel_dtypes
  gpu = bench_suite.SuiteOptions.for_platform('gpu')
  assert not gpu.tiny and gpu.kernel_dtypes == ('bfloat16',) and gpu.batch_per_device == 128
  assert gpu.attention_shapes == bench_suite.PAPER_ATTENTION
  assert bench_suite.SuiteOptions.for_platform('tpu', tiny=True).batch_per_device is None
  with pytest.raises(ValueError, match='--rows mea: unknown row'):
    bench_suite.SuiteOptions.for_platform('cpu', rows=['mae', 'mea'])
  assert bench_suite.parse_shape('197x12x64') == (197, 12, 64, 'given')
  with pytest.raises(ValueError, match="--attention_shapes '197x12': expected TOKENSx"):
    bench_suite.parse_shape('197x12')


def test_suite_rows_are_every_training_config():
  from mimjax import bench_suite
  from tests.test_scale import training_configs
  assert sorted(bench_suite.ROWS) == sorted(training_configs())
  for name in bench_suite.ROWS:  # the paper row is each config's default argument
    assert bench_suite.row_arg(name, tiny=False) not in ('', 'tiny')


@pytest.mark.slow  # every tiny row (and the two B/16 shapes in both dtypes): minutes on 2 cores
def test_the_whole_tiny_suite_from_the_command_line(tmp_path):
  import json
  import subprocess
  import sys
  from mimjax import bench_suite
  from tests.env import subprocess_env
  out = tmp_path / 'suite.json'
  run = subprocess.run([sys.executable, '-m', 'mimjax.bench', '--suite', '--out', str(out),
                        '--steps', '2', '--warmup', '1', '--torch_threads', '1'],
                       cwd=tmp_path, env=subprocess_env(1, PYTHONPATH=REPO), capture_output=True,
                       text=True)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  report = json.loads(out.read_text())
  steps = {r['name']: r for r in report['records'] if r['kind'] == 'step'}
  assert list(steps) == list(bench_suite.ROWS) and all(r['ok'] for r in steps.values())
  assert all(r['config']['row'].endswith(':tiny') for r in steps.values())
  assert steps['mae']['numbers']['torch']['img_per_s'] > 0
  assert steps['mre_mae']['config']['attention_backend'] == 'einsum'
  kernels = [r for r in report['records'] if r['kind'] == 'kernel']
  assert len(kernels) == 2 * 2 * 2 * 2  # 2 shapes × 2 dtypes × bias on/off × pallas/fused
  assert all(r['ok'] and 0 <= r['numbers']['max_err'] <= r['numbers']['tolerance']
             for r in kernels)
  # the same tiny suite with a tolerance of 0: every nonzero error fails, exit status 1
  run = subprocess.run([sys.executable, '-m', 'mimjax.bench', '--suite', '--rows=',
                        '--attention_shapes', '50x2x16', '--kernel_dtypes', 'float32',
                        '--tolerance_scale', '0', '--out', str(out)],
                       cwd=tmp_path, env=subprocess_env(1, PYTHONPATH=REPO), capture_output=True,
                       text=True)
  assert run.returncode == 1 and 'FAIL' in run.stdout
  assert not json.loads(out.read_text())['suite']['ok']


@pytest.mark.slow  # a subprocess each (~5 s of imports); rows and shapes also tested in process
@pytest.mark.parametrize('args,message', [
    (['--rows', 'mea'], '--rows mea: unknown row; expected names from mae,mre_mae,'),
    (['--out', 'no/x.json'], '--out no/x.json: no such directory'),
    (['--kernel_dtypes', 'float16'], '--kernel_dtypes float16: expected float32'),
    (['--config', 'configs/mae.py:tiny'], '--suite takes --rows/--tiny, not')])
def test_suite_flag_errors_are_one_line(args, message, tmp_path):
  import subprocess
  import sys
  from tests.env import subprocess_env
  run = subprocess.run([sys.executable, '-m', 'mimjax.bench', '--suite', *args], cwd=tmp_path,
                       env=subprocess_env(1, PYTHONPATH=REPO), capture_output=True, text=True)
  assert run.returncode == 2, run.stderr
  (line,) = run.stderr.strip().splitlines()
  assert line.startswith(f'mimjax.bench: error: {message}'), line
  assert not list(tmp_path.iterdir())  # no JSON, no half-written record
