"""TFDS builders for image folders and ImageNet (manual download), decoded in a process pool.

Every image is fully decoded (so truncated/corrupt files are caught at build time), converted
to RGB (grayscale, CMYK, alpha and palette images are converted, never rejected; alpha is
dropped like torchvision's `pil_loader`), optionally resized so the shorter side is at most
`resize_shorter`, and stored as JPEG (or PNG for PNG sources). An RGB JPEG that needs no resize
keeps its original bytes.
"""

import dataclasses
import functools
import io
import multiprocessing
import os
import sys
import tarfile
from importlib import resources
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from mimjax import logs
from mimjax.data.builders import tfds_io
from mimjax.data.builders.tfds_io import BuildError

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')
VAL_DIRS = {'val': 'validation', 'validation': 'validation', 'test': 'test'}
TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'


@dataclasses.dataclass(frozen=True)
class Task:
  """One source image: `name` (for messages), label, and a path or the raw bytes."""
  name: str
  label: int
  path: Optional[str] = None
  data: Optional[bytes] = None


@dataclasses.dataclass
class Report:
  """What a build saw: fatal errors (stop) and skipped corrupt files (--skip_corrupt)."""
  errors: list = dataclasses.field(default_factory=list)
  skipped: list = dataclasses.field(default_factory=list)
  written: dict = dataclasses.field(default_factory=dict)


def read_resource(name: str) -> list[str]:
  """Lines of a file shipped in mimjax/data/resources/."""
  text = resources.files('mimjax.data').joinpath('resources', name).read_text()
  return [line.strip() for line in text.splitlines() if line.strip()]


def imagenet_classes(name: str) -> list[str]:
  """Sorted wnids: 1000 for imagenet2012, the CMC 100-class list for imagenet100."""
  if name == 'imagenet2012':
    return read_resource('imagenet2012_synsets.txt')
  if name == 'imagenet100':
    return sorted(read_resource('imagenet100_synsets.txt'))
  raise ValueError(f'not an ImageNet variant: {name!r}')


def process_image(task: Task, resize_shorter: Optional[int] = None) -> tuple:
  """Task → (name, label, encoded RGB bytes, None) or (name, label, None, error message)."""
  try:
    raw = task.data if task.data is not None else open(task.path, 'rb').read()
    with Image.open(io.BytesIO(raw)) as img:
      fmt = img.format
      img.load()  # full decode: raises on truncated/corrupt data
      keep = fmt == 'JPEG' and img.mode == 'RGB'
      if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        # 16-bit / float grayscale: scale to 8 bit before the RGB conversion
        a = np.asarray(img, np.float64)
        a = a * (255.0 / max(a.max(), 1.0))
        img = Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
      img = img.convert('RGB')
      w, h = img.size
      if resize_shorter and min(w, h) > resize_shorter:
        s = resize_shorter / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
        keep = False
      if keep:
        return task.name, task.label, raw, None
      out = io.BytesIO()
      if fmt == 'PNG':
        img.save(out, 'PNG')
      else:
        img.save(out, 'JPEG', quality=95)
      return task.name, task.label, out.getvalue(), None
  except Exception as e:  # pylint: disable=broad-except  (any decoder failure = corrupt)
    return task.name, task.label, None, f'{type(e).__name__}: {e}'


def _imap(fn: Callable, tasks: Iterable[Task], num_workers: int) -> Iterator[tuple]:
  """Ordered map, in a process pool when num_workers > 0."""
  if num_workers <= 0:
    yield from map(fn, tasks)
    return
  # fork is cheapest, but unsafe once JAX's threads exist in this process (e.g. under tests).
  method = 'forkserver' if 'jax' in sys.modules else 'fork'
  with multiprocessing.get_context(method).Pool(num_workers) as pool:
    yield from pool.imap(fn, tasks, chunksize=8)


def _examples(tasks: Iterable[Task], total: Optional[int], report: Report, split: str, *,
              skip_corrupt: bool, num_workers: int,
              resize_shorter: Optional[int]) -> Iterator[tuple[int, dict]]:
  """(key, example) in task order; stops at the first bad file unless skip_corrupt."""
  fn = functools.partial(process_image, resize_shorter=resize_shorter)
  n = 0
  progress = logs.Progress(total, prog='mimjax.data.build', label=f'{split}: images')
  for name, label, data, err in _imap(fn, tasks, num_workers):
    progress.update(1)
    if err is not None:
      msg = f'{name}: not a readable image ({err}); expected a JPEG/PNG/... image file'
      if skip_corrupt:
        report.skipped.append(msg)
        continue
      report.errors.append(msg)
      return
    yield n, {'image': data, 'label': label}
    n += 1
  progress.close()
  report.written[split] = n


# ------------------------------------------------------------------------------- image folders
def _list_images(folder: str) -> list[str]:
  out = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    out += [os.path.join(root, f) for f in sorted(files)
            if not f.startswith('.') and f.lower().endswith(IMAGE_EXTS)]
  return out


def class_folder_tasks(split_dir: str, classes: Optional[Sequence[str]] = None,
                       required: bool = True) -> tuple[list[str], list[Task]]:
  """(class names, tasks) of a folder of class subfolders; labels = index in `classes`."""
  found = sorted(d for d in os.listdir(split_dir)
                 if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith('.'))
  if not found:
    raise BuildError(f'{split_dir}: no class subfolders; expected {split_dir}/<class>/<image>')
  if classes is None:
    classes = found
  elif required:
    missing = sorted(set(classes) - set(found))
    if missing:
      raise BuildError(f'{split_dir}: missing class folders {missing[:5]}'
                       f'{" ..." if len(missing) > 5 else ""} ({len(missing)} of {len(classes)})')
  index = {c: i for i, c in enumerate(classes)}
  tasks = []
  for c in found:
    if c not in index:
      if required:
        raise BuildError(f'{split_dir}/{c}: class not in the training classes {list(classes)[:5]}...')
      continue
    files = _list_images(os.path.join(split_dir, c))
    if not files:
      raise BuildError(f'{os.path.join(split_dir, c)}: empty class folder; expected at least '
                       f'one image ({", ".join(IMAGE_EXTS)})')
    tasks += [Task(f, index[c], path=f) for f in files]
  return list(classes), tasks


def image_folder_splits(source: str, split_val_fraction: float = 0.0,
                        seed: int = 0) -> tuple[list[str], dict[str, list[Task]]]:
  """Splits of `source`: train/ (+ val|validation|test/) or class folders directly."""
  if not os.path.isdir(source):
    raise BuildError(f'{source}: not a directory; expected a folder of class subfolders')
  train_dir = os.path.join(source, 'train')
  splits = {}
  if os.path.isdir(train_dir):
    classes, splits['train'] = class_folder_tasks(train_dir)
    for sub, split in VAL_DIRS.items():
      if os.path.isdir(os.path.join(source, sub)):
        splits[split] = class_folder_tasks(os.path.join(source, sub), classes, required=False)[1]
  else:
    classes, splits['train'] = class_folder_tasks(source)
  if split_val_fraction > 0:
    if 'validation' in splits:
      raise BuildError(f'{source}: has a validation folder; --split_val_fraction would '
                       'create a second one')
    splits['train'], splits['validation'] = holdout(splits['train'], split_val_fraction, seed)
  return classes, splits


def holdout(tasks: list[Task], fraction: float, seed: int) -> tuple[list[Task], list[Task]]:
  """Per class, a seeded `fraction` of the files (at least 1 if fraction > 0) → validation."""
  train, val = [], []
  for label in sorted({t.label for t in tasks}):
    group = [t for t in tasks if t.label == label]
    k = min(len(group) - 1, max(1, round(fraction * len(group))))
    pick = set(np.random.default_rng([seed, label]).permutation(len(group))[:k].tolist())
    for i, t in enumerate(group):
      (val if i in pick else train).append(t)
  return train, val


# ------------------------------------------------------------------------------------ ImageNet
def _tar_train_tasks(path: str, classes: Sequence[str]) -> Iterator[Task]:
  index = {c: i for i, c in enumerate(classes)}
  with tarfile.open(path) as outer:
    for member in outer:
      wnid = os.path.splitext(os.path.basename(member.name))[0]
      if not member.isfile() or wnid not in index:
        continue
      with tarfile.open(fileobj=outer.extractfile(member)) as inner:
        for m in inner:
          if m.isfile():
            yield Task(f'{TRAIN_TAR}/{member.name}/{m.name}', index[wnid],
                       data=inner.extractfile(m).read())


def _val_labels() -> list[str]:
  return read_resource('imagenet2012_validation_labels.txt')


def _flat_val_tasks(names: Iterable[tuple[str, Callable[[], bytes], str]],
                    classes: Sequence[str]) -> Iterator[Task]:
  """Official flat val files ILSVRC2012_val_%08d.JPEG, labelled by the shipped list."""
  labels = _val_labels()
  index = {c: i for i, c in enumerate(classes)}
  for base, read, shown in names:
    try:
      number = int(os.path.splitext(base)[0].rsplit('_', 1)[1])
      wnid = labels[number - 1]
    except (IndexError, ValueError):
      raise BuildError(f'{shown}: unexpected validation file name; expected '
                       'ILSVRC2012_val_00000001.JPEG ... ILSVRC2012_val_00050000.JPEG') from None
    if wnid in index:
      yield Task(shown, index[wnid], data=read())


def _tar_val_tasks(path: str, classes: Sequence[str]) -> Iterator[Task]:
  with tarfile.open(path) as tar:
    members = ((os.path.basename(m.name), functools.partial(lambda m: tar.extractfile(m).read(), m),
                f'{VAL_TAR}/{m.name}') for m in tar if m.isfile())
    yield from _flat_val_tasks(members, classes)


def imagenet_splits(source: str, name: str) -> tuple[list[str], dict[str, tuple]]:
  """{split: (task iterable, expected count or None)} from the manual-download layout."""
  classes = imagenet_classes(name)
  n_train = {'imagenet2012': 1281167}.get(name)
  n_val = {'imagenet2012': 50000, 'imagenet100': 5000}.get(name)
  expected = (f'expected {source}/train/<wnid>/*.JPEG or {source}/{TRAIN_TAR}, and '
              f'{source}/val/ (wnid folders or flat ILSVRC2012_val_*.JPEG) or {source}/{VAL_TAR}')
  if not os.path.isdir(source):
    raise BuildError(f'{source}: not a directory; {expected}')
  splits = {}
  train_dir, train_tar = os.path.join(source, 'train'), os.path.join(source, TRAIN_TAR)
  if os.path.isdir(train_dir):
    _, tasks = class_folder_tasks(train_dir, classes, required=True)
    splits['train'] = (tasks, len(tasks))
  elif os.path.isfile(train_tar):
    splits['train'] = (_tar_train_tasks(train_tar, classes), n_train)
  val_dir, val_tar = os.path.join(source, 'val'), os.path.join(source, VAL_TAR)
  if os.path.isdir(val_dir):
    if any(os.path.isdir(os.path.join(val_dir, d)) for d in os.listdir(val_dir)):
      _, tasks = class_folder_tasks(val_dir, classes, required=False)
    else:
      files = sorted(f for f in os.listdir(val_dir) if f.lower().endswith(IMAGE_EXTS))
      tasks = list(_flat_val_tasks(
          ((f, functools.partial(_read_file, os.path.join(val_dir, f)),
            os.path.join(val_dir, f)) for f in files), classes))
    splits['validation'] = (tasks, len(tasks))
  elif os.path.isfile(val_tar):
    splits['validation'] = (_tar_val_tasks(val_tar, classes), n_val)
  if not splits:
    raise BuildError(f'{source}: no ImageNet files found; {expected}')
  return classes, splits


def _read_file(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


# -------------------------------------------------------------------------------------- build
def build_from_tasks(data_dir: str, name: str, classes: Sequence[str], splits: dict, *,
                     skip_corrupt: bool = False, num_workers: int = 0,
                     resize_shorter: Optional[int] = None, overwrite: bool = False,
                     description: str = '') -> tuple[str, Report]:
  """Writes `splits` ({split: (tasks, total)}) as TFDS `name`; raises BuildError on bad input."""
  report = Report()
  gens = {
      split: functools.partial(_examples, tasks, total, report, split,
                               skip_corrupt=skip_corrupt, num_workers=num_workers,
                               resize_shorter=resize_shorter)
      for split, (tasks, total) in splits.items()
  }

  def check(tmp_path: str) -> None:
    if report.errors:
      raise BuildError(report.errors[0])
    empty = [s for s in splits if report.written.get(s, 0) == 0]
    if empty:
      raise BuildError(f'split(s) {empty} of {name!r} have no readable images')
    if report.skipped:
      with open(os.path.join(tmp_path, 'skipped_files.txt'), 'w') as f:
        f.write('\n'.join(report.skipped) + '\n')

  features = tfds_io.features_dict(classes, encoding_format='jpeg')
  try:
    path = tfds_io.write_tfds(data_dir, name, features, gens, description=description,
                              overwrite=overwrite, after_write=check)
  except BuildError:
    raise
  except Exception:
    if report.errors:  # TFDS may fail on the truncated split first: report the real cause
      raise BuildError(report.errors[0]) from None
    raise
  return path, report
