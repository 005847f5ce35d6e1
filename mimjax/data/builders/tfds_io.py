"""Write and read TFDS data sets (array_record) without TensorFlow.

Images are stored as encoded PNG/JPEG bytes in a `tfds.features.Image` (TFDS only needs
TensorFlow to *encode* numpy arrays; bytes pass straight through and decode with PIL), segment
maps as zlib-compressed `Tensor`s. Every write goes to a temporary directory next to the target
and is renamed into place at the end, so a failed or interrupted build leaves nothing behind.
"""

import contextlib
import io
import os
import shutil
import types
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from mimjax import workdir as workdir_lib

VERSION = '1.0.0'
ENV_DATA_DIR = 'MIMJAX_DATA_DIR'

ExampleIter = Iterable[tuple[object, dict]]


class BuildError(Exception):
  """A data set could not be built from its source (the message names the file)."""


def default_data_dir() -> str:
  """`$MIMJAX_DATA_DIR`, else `~/.cache/mimjax/tfds`."""
  return os.environ.get(ENV_DATA_DIR) or os.path.join(
      os.path.expanduser('~'), '.cache', 'mimjax', 'tfds')


def resolve_data_dir(data_dir: Optional[str]) -> str:
  """`data_dir`, or the default cache dir when empty/None."""
  return os.path.expanduser(data_dir) if data_dir else default_data_dir()


def features_dict(label_names: Sequence[str], *, with_segments: bool = False,
                  encoding_format: str = 'png') -> tfds.features.FeaturesDict:
  """The record layout: image (H,W,3 uint8), label, optional segments (H,W uint8, 0 = none)."""
  feats = {
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format=encoding_format),
      'label': tfds.features.ClassLabel(names=list(label_names)),
  }
  if with_segments:
    feats['segments'] = tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                             encoding='zlib')
  return tfds.features.FeaturesDict(feats)


def encode_image(image: np.ndarray, fmt: str = 'png', quality: int = 95) -> bytes:
  """uint8 (H, W, 3) → PNG/JPEG bytes (PIL; no TensorFlow)."""
  buf = io.BytesIO()
  kwargs = {'quality': quality} if fmt.lower() in ('jpeg', 'jpg') else {}
  Image.fromarray(np.asarray(image, np.uint8)).save(
      buf, 'JPEG' if fmt.lower() in ('jpeg', 'jpg') else 'PNG', **kwargs)
  return buf.getvalue()


def _builder_class(name: str, features: tfds.features.FeaturesDict, description: str,
                   split_generators: Mapping[str, Callable[[], ExampleIter]],
                   version: str = VERSION):
  """A throw-away GeneratorBasedBuilder subclass (unregistered, so names may repeat)."""

  def body(ns):
    ns['name'] = name
    ns['VERSION'] = tfds.core.Version(version)

    def _info(self):
      # Keys are written in the generator's order, so record i is the i-th example yielded.
      return tfds.core.DatasetInfo(builder=self, description=description,
                                   features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in split_generators}

    def _generate_examples(self, split):
      return split_generators[split]()

    def _quiet(self):
      """tfds announces the temp dir as 'downloaded and prepared' before our checks ran; the
      callers print the final path once it is in place."""

    ns['_info'] = _info
    ns['_log_download_done'] = _quiet
    ns['_log_download_bytes'] = _quiet
    ns['_split_generators'] = _split_generators
    ns['_generate_examples'] = _generate_examples

  cls_name = ''.join(p.title() for p in name.split('_')) + 'Writer'
  return types.new_class(cls_name, (tfds.core.GeneratorBasedBuilder,),
                         {'skip_registration': True}, body)


def write_tfds(data_dir: str, name: str, features: tfds.features.FeaturesDict,
               split_generators: Mapping[str, Callable[[], ExampleIter]], *,
               description: str = '', overwrite: bool = False,
               after_write: Optional[Callable[[str], None]] = None,
               version: str = VERSION) -> str:
  """Writes `data_dir/name/version` atomically (temp dir + rename); returns its path.

  `split_generators[split]()` yields `(key, example)` in record order. `after_write(tmp_path)`
  runs on the finished temp copy before the rename (to add files or raise and abort).
  """
  data_dir = resolve_data_dir(data_dir)
  final = os.path.join(data_dir, name, version)
  if os.path.exists(final) and not overwrite:
    raise BuildError(f'{final} already exists; pass overwrite=True (--overwrite) to rebuild')
  workdir_lib.check_output_dir(data_dir, '--data_dir')
  os.makedirs(data_dir, exist_ok=True)
  workdir_lib.remove_stale_temp(data_dir, prefix=f'.{name}.')  # left by killed builds
  tmp_root = workdir_lib.temp_name(os.path.join(data_dir, name))
  try:
    cls = _builder_class(name, features, description, split_generators, version)
    builder = cls(data_dir=tmp_root, file_format='array_record')
    builder.download_and_prepare(download_dir=os.path.join(tmp_root, 'downloads'))
    built = os.path.join(tmp_root, name, version)
    if after_write is not None:
      after_write(built)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if overwrite and os.path.exists(final):
      shutil.rmtree(final)
    try:
      os.rename(built, final)
    except OSError:
      # Lost a race with a concurrent builder of the same data set: theirs is as good.
      if not os.path.exists(os.path.join(final, 'dataset_info.json')):
        raise
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  return final


def find_dataset_dir(data_dir: Optional[str], name: str) -> Optional[str]:
  """The prepared directory of `name` under `data_dir` (highest version), or None.

  `data_dir` may also point straight at a prepared data set (a dir with dataset_info.json),
  e.g. the SAM stage's output.
  """
  data_dir = resolve_data_dir(data_dir)
  if os.path.exists(os.path.join(data_dir, 'dataset_info.json')):
    return data_dir
  root = os.path.join(data_dir, name)
  if not os.path.isdir(root):
    return None
  versions = [v for v in os.listdir(root)
              if os.path.exists(os.path.join(root, v, 'dataset_info.json'))]
  if not versions:
    return None
  best = max(versions, key=lambda v: tuple(int(x) for x in v.split('.') if x.isdigit()))
  return os.path.join(root, best)


def load_builder(path: str):
  """A read-only TFDS builder for a prepared directory."""
  return tfds.builder_from_directory(path)


def split_sizes(path: str) -> dict:
  """{split name: number of examples} of a prepared directory."""
  return {k: int(v.num_examples) for k, v in load_builder(path).info.splits.items()}


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
  """Exclusive inter-process lock on `path` (so concurrent first uses build once)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    import filelock  # optional: without it, write_tfds' rename-race tolerance still holds
  except ImportError:
    yield
    return
  with filelock.FileLock(path):
    yield
