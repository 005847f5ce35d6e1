"""Inputs of the SAM stage: a prepared TFDS data set (by name or directory) or an image folder.

Every example becomes a `folder.Task` carrying the stored (encoded) image bytes, so decoding,
RGB conversion, optional downscaling and the corrupt-file rule are exactly the data builder's
(`mimjax.data.builders.folder.process_image`).
"""

import dataclasses
import os
from typing import Optional, Sequence

import tensorflow_datasets as tfds

from mimjax.data.builders import embedded, folder, tfds_io


@dataclasses.dataclass
class Input:
  """A readable source: output name, class names, {split: random-access Task sequence}."""
  name: str
  classes: list
  splits: dict
  encoding_format: str
  path: str


class TfdsTasks(Sequence):
  """Random-access Tasks over one split of a prepared TFDS directory (images not decoded)."""

  def __init__(self, path: str, split: str):
    self._path, self._split = path, split
    self._source = None
    self._n = tfds_io.split_sizes(path)[split]

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self._n))]
    if self._source is None:  # opened lazily: cheap to plan, and picklable before first use
      builder = tfds_io.load_builder(self._path)
      self._source = builder.as_data_source(
          split=self._split, decoders={'image': tfds.decode.SkipDecoding()})
    ex = self._source[int(i)]
    return folder.Task(f'{self._split}[{i}]', int(ex['label']), data=bytes(ex['image']))


def _tfds_input(path: str) -> Input:
  builder = tfds_io.load_builder(path)
  feats = builder.info.features
  if 'image' not in feats or 'label' not in feats:
    raise ValueError(f'{path}: records need `image` and `label` features, found {list(feats)}')
  fmt = getattr(feats['image'], 'encoding_format', None) or 'png'
  splits = {s: TfdsTasks(path, s) for s in sorted(builder.info.splits.keys())}
  return Input(builder.info.name, list(feats['label'].names), splits, fmt, path)


def open_input(source: str, source_data_dir: Optional[str] = None) -> Input:
  """`source`: embedded name ('photos'), a prepared TFDS dir, a data set name under
  `source_data_dir`, or an image folder (class subfolders, optionally under train/ val/)."""
  if not source:
    raise ValueError('config.source is empty; expected an embedded name (photos, digits), a '
                     'prepared TFDS directory, a data set name under config.source_data_dir, '
                     'or an image folder')
  if source in embedded.EMBEDDED:
    return _tfds_input(embedded.ensure_embedded(source, source_data_dir or None))
  path = os.path.expanduser(source)
  if os.path.isfile(os.path.join(path, 'dataset_info.json')):
    return _tfds_input(path)
  if os.path.isdir(path):
    classes, splits = folder.image_folder_splits(path)
    return Input('image_folder', classes, splits, 'jpeg', path)
  if os.sep not in source:
    found = tfds_io.find_dataset_dir(source_data_dir or None, source)
    if found:
      return _tfds_input(found)
    root = tfds_io.resolve_data_dir(source_data_dir or None)
    raise FileNotFoundError(f'config.source={source!r}: no prepared data set {root}/{source}/'
                            f'<version>/dataset_info.json (set config.source_data_dir) and no '
                            f'such folder')
  raise FileNotFoundError(f'config.source={source!r}: no such directory; expected a prepared '
                          'TFDS directory (with dataset_info.json) or an image folder')
