"""TFDS builders: embedded sets, image folders (mixed formats), ImageNet layout, bad input."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from mimjax import workdir
from mimjax.data import build, pipeline
from mimjax.data.builders import embedded, folder, tfds_io


def _read(path, split):
  return tfds_io.load_builder(path).as_data_source(split=split)


def test_embedded_digits_read_back(embedded_dir):
  path = tfds_io.find_dataset_dir(embedded_dir, 'digits')
  assert tfds_io.split_sizes(path) == {'train': 1500, 'test': 297}
  src = _read(path, 'train')
  images, labels = embedded.digits_arrays('train')
  for i in (0, 777, 1499):
    ex = src[i]
    assert ex['image'].shape == (32, 32, 3) and ex['image'].dtype == np.uint8
    np.testing.assert_array_equal(ex['image'], images[i])
    assert ex['label'] == labels[i]
  # nearest ×4 upsampling of 0..16 values scaled to 0..255
  assert images.max() >= 250
  # Bicubic upsampling: 4×4 patches are not flat (nearest would give all-zero norm-pix targets).
  patches = images[:100, :, :, 0].reshape(100, 8, 4, 8, 4).transpose(0, 1, 3, 2, 4)
  assert patches.reshape(100, 64, 16).std(-1).mean() > 5


def test_embedded_photos_read_back(embedded_dir):
  path = tfds_io.find_dataset_dir(embedded_dir, 'photos')
  src = _read(path, 'train')
  assert len(src) == len(embedded.PHOTOS)
  ex = src[0]
  assert ex['image'].shape == (512, 512, 3) and ex['label'] == 0  # astronaut
  np.testing.assert_array_equal(ex['image'], embedded.photo_array('astronaut'))
  assert src[8]['image'].shape == (512, 512, 3)  # camera: grayscale → RGB


def test_embedded_auto_build_on_first_use(tmp_path, monkeypatch):
  monkeypatch.setenv(tfds_io.ENV_DATA_DIR, str(tmp_path / 'cache'))
  c = pipeline.default_data_config()  # data_dir None → $MIMJAX_DATA_DIR
  assert pipeline.num_examples(c, 'test') == 297
  assert os.path.exists(tmp_path / 'cache' / 'digits' / embedded.VERSIONS['digits'] / 'dataset_info.json')
  assert not [d for d in os.listdir(tmp_path / 'cache') if d.startswith('.tmp')]


def _save(path, arr, mode=None, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = Image.fromarray(arr)
  if mode:
    img = img.convert(mode)
  img.save(path, fmt)


def _folder(root, corrupt=False):
  rng = np.random.default_rng(0)
  rgb = lambda: rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  _save(f'{root}/cat/a.jpg', rgb())
  _save(f'{root}/cat/b.png', rgb())
  _save(f'{root}/cat/c_gray.png', rgb(), 'L')
  _save(f'{root}/dog/d_cmyk.jpg', rgb(), 'CMYK')
  _save(f'{root}/dog/e_rgba.png', rgb(), 'RGBA')
  _save(f'{root}/dog/f_palette.png', rgb(), 'P')
  _save(f'{root}/dog/g_big.jpg', rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
  with open(f'{root}/dog/notes.txt', 'w') as f:  # non-image extensions are ignored
    f.write('x')
  if corrupt:
    with open(f'{root}/dog/bad.jpg', 'wb') as f:
      f.write(b'\xff\xd8\xff\xe0 this is not a jpeg')
  return root


def _cli(*argv):
  return build.main([str(a) for a in argv])


def test_image_folder_build_all_modes(tmp_path):
  src = _folder(str(tmp_path / 'src'))
  out = tmp_path / 'out'
  assert _cli('image_folder', '--source', src, '--data_dir', out, '--num_workers', 2,
              '--resize_shorter', 40) == 0
  path = tfds_io.find_dataset_dir(str(out), 'image_folder')
  ds = _read(path, 'train')
  assert len(ds) == 7
  labels = [ds[i]['label'] for i in range(7)]
  assert labels == [0, 0, 0, 1, 1, 1, 1]  # sorted class folders, sorted files
  for i in range(7):
    img = ds[i]['image']
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
  assert ds[6]['image'].shape == (40, 60, 3)   # shorter side 60 → 40
  assert ds[0]['image'].shape == (20, 30, 3)   # already small: untouched
  # lossless PNG source → identical pixels
  np.testing.assert_array_equal(ds[1]['image'],
                                np.asarray(Image.open(f'{src}/cat/b.png').convert('RGB')))
  # the loader reads it
  c = pipeline.default_data_config()
  c.update(name='image_folder', data_dir=str(out), image_size=16)
  b = next(pipeline.make_loader(c, global_batch_size=4, seed=0))
  assert b['image'].shape == (4, 16, 16, 3)


def test_corrupt_file_clear_error_and_nothing_left(tmp_path, capsys):
  src = _folder(str(tmp_path / 'src'), corrupt=True)
  out = tmp_path / 'out'
  assert _cli('image_folder', '--source', src, '--data_dir', out, '--num_workers', 0) == 1
  err = capsys.readouterr().err
  assert 'bad.jpg' in err and 'expected' in err and 'Traceback' not in err
  assert len([l for l in err.splitlines() if 'error' in l.lower()]) == 1
  assert not (out / 'image_folder').exists() or not os.listdir(out / 'image_folder')
  assert not [d for d in os.listdir(out) if '.tmp' in d]


def test_stale_temp_of_a_killed_build_is_removed_and_no_misleading_line(tmp_path, capsys):
  src = _folder(str(tmp_path / 'src'))
  out = tmp_path / 'out'
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True).stdout.strip()
  stale = os.path.basename(workdir.temp_name(str(out / 'image_folder'))).replace(
      f'-{os.getpid()}-', f'-{dead}-')
  os.makedirs(out / stale / 'image_folder')  # what a kill -9 mid-build leaves
  assert _cli('image_folder', '--source', src, '--data_dir', out, '--num_workers', 0) == 0
  assert sorted(os.listdir(out)) == ['image_folder']
  captured = capsys.readouterr()
  assert 'downloaded and prepared' not in captured.out + captured.err  # tfds' temp-dir line
  (tmp_path / 'file').write_text('x')
  assert _cli('image_folder', '--source', src, '--data_dir', tmp_path / 'file') == 1
  assert 'exists and is not a directory' in capsys.readouterr().err


def test_skip_corrupt_reports(tmp_path, capsys):
  src = _folder(str(tmp_path / 'src'), corrupt=True)
  out = tmp_path / 'out'
  assert _cli('image_folder', '--source', src, '--data_dir', out, '--skip_corrupt',
              '--num_workers', 0) == 0
  text = capsys.readouterr().out
  assert 'skipped 1 corrupt file' in text and 'bad.jpg' in text
  path = tfds_io.find_dataset_dir(str(out), 'image_folder')
  assert tfds_io.split_sizes(path) == {'train': 7}
  assert 'bad.jpg' in open(os.path.join(path, 'skipped_files.txt')).read()


def test_empty_class_folder_error(tmp_path, capsys):
  src = _folder(str(tmp_path / 'src'))
  os.makedirs(tmp_path / 'src' / 'empty')
  assert _cli('image_folder', '--source', src, '--data_dir', tmp_path / 'out') == 1
  err = capsys.readouterr().err
  assert 'empty' in err and 'empty class folder' in err


def test_split_val_fraction(tmp_path):
  src = _folder(str(tmp_path / 'src'))
  _, splits = folder.image_folder_splits(src, 0.34, seed=0)
  assert len(splits['train']) + len(splits['validation']) == 7
  assert sorted({t.label for t in splits['validation']}) == [0, 1]
  again = folder.image_folder_splits(src, 0.34, seed=0)[1]
  assert [t.name for t in again['validation']] == [t.name for t in splits['validation']]


def test_imagenet_missing_manual_files(tmp_path, capsys):
  assert _cli('imagenet2012', '--source', tmp_path, '--data_dir', tmp_path / 'out') == 1
  err = capsys.readouterr().err
  assert 'ILSVRC2012_img_train.tar' in err and 'Traceback' not in err


def test_imagenet100_from_folders_and_flat_val(tmp_path):
  classes = folder.imagenet_classes('imagenet100')
  assert len(classes) == 100 and classes == sorted(classes)
  assert len(folder.imagenet_classes('imagenet2012')) == 1000
  val_labels = folder.read_resource('imagenet2012_validation_labels.txt')
  assert len(val_labels) == 50000 and val_labels[0] == 'n01751748'
  rng = np.random.default_rng(0)
  # two train classes of the 100 (the builder requires all 100 folders → fake the rest)
  for c in classes:
    _save(f'{tmp_path}/src/train/{c}/{c}_1.JPEG', rng.integers(0, 256, (8, 8, 3), np.uint8))
  # flat val: pick the first val files whose label is in the 100 classes, plus one that is not
  wanted = [i for i, w in enumerate(val_labels) if w in classes][:3]
  other = next(i for i, w in enumerate(val_labels) if w not in classes)
  for i in wanted + [other]:
    _save(f'{tmp_path}/src/val/ILSVRC2012_val_{i + 1:08d}.JPEG',
          rng.integers(0, 256, (8, 8, 3), np.uint8))
  assert _cli('imagenet100', '--source', tmp_path / 'src', '--data_dir', tmp_path / 'out',
              '--num_workers', 0) == 0
  path = tfds_io.find_dataset_dir(str(tmp_path / 'out'), 'imagenet100')
  assert tfds_io.split_sizes(path) == {'train': 100, 'validation': 3}
  val = _read(path, 'validation')
  assert [val[k]['label'] for k in range(3)] == [classes.index(val_labels[i]) for i in wanted]


def test_cli_subprocess_exit_status(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'mimjax.data.build', 'image_folder', '--source',
                      str(tmp_path / 'nope'), '--data_dir', str(tmp_path / 'out')],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and 'nope' in r.stderr and 'Traceback' not in r.stderr


def test_imagenet_from_official_tars(tmp_path):
  import io
  import tarfile
  classes = folder.imagenet_classes('imagenet2012')
  val_labels = folder.read_resource('imagenet2012_validation_labels.txt')
  rng = np.random.default_rng(0)

  def jpeg():
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 10, 3), np.uint8)).save(buf, 'JPEG')
    return buf.getvalue()

  def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  src = tmp_path / 'src'
  src.mkdir()
  with tarfile.open(src / folder.TRAIN_TAR, 'w') as outer:
    for wnid in (classes[5], classes[0]):
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode='w') as inner:
        for k in range(2):
          add(inner, f'{wnid}_{k}.JPEG', jpeg())
      add(outer, f'{wnid}.tar', buf.getvalue())
  with tarfile.open(src / folder.VAL_TAR, 'w') as tar:
    for i in (1, 2, 3):
      add(tar, f'ILSVRC2012_val_{i:08d}.JPEG', jpeg())
  assert _cli('imagenet2012', '--source', src, '--data_dir', tmp_path / 'out',
              '--num_workers', 2) == 0
  path = tfds_io.find_dataset_dir(str(tmp_path / 'out'), 'imagenet2012')
  assert tfds_io.split_sizes(path) == {'train': 4, 'validation': 3}
  assert [_read(path, 'train')[k]['label'] for k in range(4)] == [5, 5, 0, 0]
  val = _read(path, 'validation')
  assert [val[k]['label'] for k in range(3)] == [classes.index(w) for w in val_labels[:3]]
  assert val[0]['image'].shape == (8, 10, 3)
