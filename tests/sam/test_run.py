"""SAM stage end to end on a tiny image folder: tiny SAM, superpixels, resume, errors."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import sam as sam_config
from mimjax.data import pipeline
from mimjax.data.builders.tfds_io import BuildError
from mimjax.sam import run, sources

PHOTOS = {'cat': ('chelsea', 'coffee'), 'sky': ('rocket', 'astronaut')}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """class/<name>.png: four scikit-image photos downscaled to 40 px on the shorter side."""
  import skimage.data
  root = tmp_path_factory.mktemp('photos')
  for cls, names in PHOTOS.items():
    os.makedirs(root / cls)
    for name in names:
      img = Image.fromarray(getattr(skimage.data, name)()[..., :3])
      s = 40 / min(img.size)
      img.resize((round(img.width * s), round(img.height * s))).save(root / cls / f'{name}.png')
  return str(root)


def _config(source, arg='tiny', **kw):
  c = sam_config.get_config(arg)
  c.update(source=source, chunk_size=1, num_threads=1, points_per_side=4, **kw)
  return c


def _read(path):
  b = tfds.builder_from_directory(path)
  return b, [dict(ex) for ex in b.as_data_source(split='train')]


def _check_maps(records, max_masks=5):
  for ex in records:
    seg = np.asarray(ex['segments'])
    assert seg.dtype == np.uint8 and seg.shape == np.asarray(ex['image']).shape[:2]
    assert seg.max() <= max_masks


@pytest.mark.parametrize('arg', ['tiny', 'tiny,superpixel'])
def test_run_writes_tfds_readable_by_pipeline(folder, tmp_path, arg):
  path = run.run(_config(folder, arg), str(tmp_path))
  assert path == str(tmp_path / 'image_folder' / '1.0.0')
  builder, records = _read(path)
  assert builder.info.features['label'].names == ['cat', 'sky']
  assert [int(r['label']) for r in records] == [0, 0, 1, 1]  # folder order kept
  _check_maps(records)
  assert sum(int(np.asarray(r['segments']).max() > 0) for r in records) >= 3
  assert not os.path.exists(tmp_path / '.sam_work' / 'image_folder')  # parts merged + removed
  # The training pipeline finds it by name + data_dir, segments follow the 'mae' crop.
  data = pipeline.default_data_config()
  data.update(name='image_folder', data_dir=str(tmp_path), image_size=32, augment='mae')
  batch = next(pipeline.make_loader(data, global_batch_size=4, seed=0))
  assert batch['image'].shape == (4, 32, 32, 3)
  assert batch['segments'].shape == (4, 32, 32) and batch['segments'].dtype == np.uint8
  assert batch['segments'].max() <= 5 and batch['segments'].max() > 0
  # Re-running a finished run is a no-op that returns the same path.
  assert run.run(_config(folder, arg), str(tmp_path)) == path


def test_superpixel_ranked_by_area(folder, tmp_path):
  path = run.run(_config(folder, 'tiny,superpixel', max_masks=2), str(tmp_path))
  _, records = _read(path)
  for r in records:
    seg = np.asarray(r['segments'])
    labels = sources.superpixel_labels(np.asarray(r['image']), _config(folder).superpixel)
    areas = np.sort(np.unique(labels, return_counts=True)[1])[::-1]
    # Superpixels do not overlap: ids 1, 2 cover exactly the two largest areas.
    assert [int((seg == k).sum()) for k in (1, 2)] == list(areas[:2])


def test_resume_skips_finished_chunks(folder, tmp_path, monkeypatch):
  calls = []
  real = sources.make_superpixel_source

  def counting(config):
    gen = real(config)
    return lambda image: calls.append(image.shape) or gen(image)

  monkeypatch.setattr(sources, 'make_superpixel_source', counting)
  cfg = _config(folder, 'tiny,superpixel', num_shards=2, shard_index=0)
  assert run.run(cfg, str(tmp_path)) is None  # shard 1 still missing: nothing published
  assert not os.path.exists(tmp_path / 'image_folder')
  assert len(calls) == 2
  work = tmp_path / '.sam_work' / 'image_folder'
  # A kill -9 mid-chunk leaves only a temp file: it must be ignored and redone.
  (work / '.train-000001.npz.tmp-otherhost-1-beef').write_bytes(b'partial')
  # A different config must not mix with these parts.
  with pytest.raises(ValueError, match='max_masks'):
    run.run(_config(folder, 'tiny,superpixel', num_shards=2, shard_index=1, max_masks=3),
            str(tmp_path))
  cfg.shard_index = 1
  path = run.run(cfg, str(tmp_path))
  assert len(calls) == 4  # only shard 1's two images were processed again
  _, records = _read(path)
  assert [int(r['label']) for r in records] == [0, 0, 1, 1]
  _check_maps(records)


def test_no_mask_and_corrupt_images(folder, tmp_path, monkeypatch, capsys):
  bad = tmp_path / 'src'
  os.makedirs(bad / 'a')
  for name in ('x.png', 'y.png'):
    Image.open(os.path.join(folder, 'cat', 'chelsea.png')).save(bad / 'a' / name)
  (bad / 'a' / 'z.png').write_bytes(b'\x89PNG not really')
  out = tmp_path / 'out'
  with pytest.raises(BuildError, match='z.png'):
    run.run(_config(str(bad), 'tiny,superpixel'), str(out))
  monkeypatch.setattr(sources, 'make_superpixel_source', lambda config: lambda image: [])
  path = run.run(_config(str(bad), 'tiny,superpixel', skip_corrupt=True), str(out / 'b'))
  _, records = _read(path)
  assert len(records) == 2 and all(np.asarray(r['segments']).max() == 0 for r in records)
  err = capsys.readouterr().err
  assert '2 images, 2 without any mask (all-zero map), 1 corrupt skipped' in err
  assert 'z.png' in open(os.path.join(path, 'skipped_files.txt')).read()
  # Issue 28.9: said loudly, and MRE/KD training (a loader shipping patch ids) refuses the set
  # in one line naming sam_stats.json and the override; plain MAE reads it as before.
  assert ('mimjax.sam: WARNING: 2 of 2 images (100%) got no mask: MRE/KD training on them is '
          'plain MAE (it refuses a set above 90%).') in err
  data = pipeline.default_data_config()
  data.update(name='image_folder', data_dir=str(out / 'b'), image_size=32, augment='mae')
  assert next(pipeline.make_loader(data, global_batch_size=2, seed=0))['segments'].max() == 0
  data.segment_patch_size = 8
  with pytest.raises(ValueError) as e:
    pipeline.make_loader(data, global_batch_size=2, seed=0)
  assert str(e.value) == (
      f'{path}/sam_stats.json: 2 of 2 train images (100%) got no SAM mask, so this run would '
      'train on empty segment maps (plain MAE); re-make the masks with the right checkpoint or '
      'looser thresholds (docs/sam.md), or pass --config.data.max_maskless_fraction=1 to train '
      'anyway')
  data.max_maskless_fraction = 1.0
  assert next(pipeline.make_loader(data, global_batch_size=2, seed=0))['segment_ids'].max() == 0


def test_failed_start_then_suggested_fix_in_the_same_workdir(folder, tmp_path):
  """The first chunk fails (a corrupt file): no part exists, so the re-run with the fix the
  error suggests is not refused as 'partial results of a different run'."""
  src = tmp_path / 'src'
  os.makedirs(src / 'a')
  (src / 'a' / 'a.png').write_bytes(b'\x89PNG not really')
  Image.open(os.path.join(folder, 'cat', 'chelsea.png')).save(src / 'a' / 'x.png')
  with pytest.raises(BuildError, match='pass --config.skip_corrupt=True'):
    run.run(_config(str(src), 'tiny,superpixel'), str(tmp_path / 'out'))
  path = run.run(_config(str(src), 'tiny,superpixel', skip_corrupt=True), str(tmp_path / 'out'))
  assert len(_read(path)[1]) == 1


def test_workdir_that_is_a_file(folder, tmp_path):
  (tmp_path / 'f').write_text('x')
  out = subprocess.run([sys.executable, '-m', 'mimjax.sam', '--config', 'configs/sam.py:tiny',
                        '--workdir', str(tmp_path / 'f'), f'--config.source={folder}'],
                       cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      f'mimjax.sam: error: --workdir {tmp_path / "f"}: exists and is not a directory; '
      'expected a directory (new or from an earlier run)')


def test_missing_and_wrong_checkpoint(tmp_path, folder):
  cfg = _config(folder, 'vit_b', checkpoint=str(tmp_path / 'nope.pth'))
  with pytest.raises(sources.CheckpointError) as e:
    run.run(cfg, str(tmp_path))
  msg = str(e.value)
  assert 'nope.pth not found' in msg and 'sam_vit_b_01ec64.pth' in msg
  assert 'https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth' in msg
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(b'not a checkpoint')
  with pytest.raises(sources.CheckpointError, match='not a readable PyTorch state dict'):
    sources.load_sam('vit_h', str(junk))
  import torch
  tiny = tmp_path / 'tiny.pth'
  torch.save(sources.build_tiny_sam(cfg.tiny_sam, 0).state_dict(), tiny)
  with pytest.raises(sources.CheckpointError, match="does not fit model_type='vit_b'"):
    sources.load_sam('vit_b', str(tiny))
  # The CLI: one error line naming the expected file, no traceback, non-zero exit.
  proc = subprocess.run(
      [sys.executable, '-m', 'mimjax.sam', '--config', 'configs/sam.py:vit_h',
       '--workdir', str(tmp_path / 'w'), f'--config.source={folder}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  assert 'config.checkpoint is empty' in proc.stderr and 'sam_vit_h_4b8939.pth' in proc.stderr


def test_config_rows_and_validation():
  assert sam_config.get_config('vit_h,grid16').points_per_side == 16
  assert sam_config.get_config('vit_l,grid8').model_type == 'vit_l'
  c = sam_config.get_config('vit_h,in100')
  assert (c.points_per_side, c.max_masks, c.rank_by, c.amg.pred_iou_thresh,
          c.amg.stability_score_thresh) == (32, 5, 'predicted_iou', 0.88, 0.95)
  c.rank_by = 'confidence'
  with pytest.raises(ValueError, match='config.rank_by'):
    run.validate_config(c)
  c = sam_config.get_config('tiny,superpixel')
  c.rank_by = 'predicted_iou'
  with pytest.raises(ValueError, match="rank_by must be 'area'"):
    run.validate_config(c)
  c = sam_config.get_config('tiny')
  c.shard_index = 2
  with pytest.raises(ValueError, match='config.shard_index'):
    run.validate_config(c)


@pytest.mark.slow
def test_kill_and_rerun(folder, tmp_path):
  """kill -9 a real run after its first part file, then re-run: complete, same result."""
  import signal
  import time
  cmd = [sys.executable, '-m', 'mimjax.sam', '--config', 'configs/sam.py:tiny,superpixel',
         '--workdir', str(tmp_path / 'w'), f'--config.source={folder}',
         '--config.chunk_size=1']
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  work = tmp_path / 'w' / '.sam_work' / 'image_folder'
  deadline = time.time() + 120
  while time.time() < deadline and not list(work.glob('*.npz')):
    time.sleep(0.05)
  assert list(work.glob('*.npz')), 'no part file appeared'
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / 'w' / 'image_folder').exists()
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
  _, records = _read(str(tmp_path / 'w' / 'image_folder' / '1.0.0'))
  assert [int(r['label']) for r in records] == [0, 0, 1, 1]
  _check_maps(records)
