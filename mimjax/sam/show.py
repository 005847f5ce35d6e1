"""`python -m mimjax.sam.show --data_dir D --n 8 --out grid.png`: images with segment overlays.

D is a prepared data set directory (with dataset_info.json) or a data dir holding one (`--name`
picks it). Each column shows an image and, below it, the image with ids 1..c tinted (tab10
colours, id 1 = most confident) and mask boundaries drawn; id 0 (no mask) is left untinted.
"""

import os

from absl import app
from absl import flags
import numpy as np

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Prepared data set dir (or its data dir).')
_NAME = flags.DEFINE_string('name', '', 'Data set name under --data_dir (when not a set dir).')
_SPLIT = flags.DEFINE_string('split', 'train', 'Split to draw.')
_N = flags.DEFINE_integer('n', 8, 'Number of images.')
_OUT = flags.DEFINE_string('out', 'grid.png', 'Output PNG.')
flags.mark_flags_as_required(['data_dir'])


def overlay(image: np.ndarray, segments: np.ndarray, alpha: float = 0.55) -> np.ndarray:
  """(H, W, 3) uint8 with ids ≥ 1 tinted in tab10 colours and id boundaries in white."""
  from matplotlib import colormaps
  colors = (np.asarray(colormaps['tab10'].colors) * 255).astype(np.float64)
  out = image.astype(np.float64)
  seg = segments.astype(np.int64)
  tint = colors[(seg - 1) % len(colors)]
  on = seg > 0
  out[on] = (1 - alpha) * out[on] + alpha * tint[on]
  edge = np.zeros_like(on)
  edge[:-1] |= seg[:-1] != seg[1:]
  edge[:, :-1] |= seg[:, :-1] != seg[:, 1:]
  out[edge] = 255
  return out.round().astype(np.uint8)


def draw_grid(examples: list, out: str, max_masks: int = 0) -> None:
  """Writes a 2-row grid (image / overlay) of `examples` [(image, segments, title)]."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  n = len(examples)
  fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 5.4), squeeze=False)
  for j, (image, seg, title) in enumerate(examples):
    ids = [int(i) for i in np.unique(seg) if i]
    axes[0, j].imshow(image)
    axes[0, j].set_title(title, fontsize=8)
    axes[1, j].imshow(overlay(image, seg))
    axes[1, j].set_title(f'ids {ids} ({np.mean(seg > 0):.0%})', fontsize=8)
    for ax in axes[:, j]:
      ax.axis('off')
  fig.suptitle(f'segments: tinted = mask id (1 = most confident{f", c={max_masks}" if max_masks else ""}), '
               'untinted = 0 (no mask)', fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)


def load_examples(data_dir: str, name: str, split: str, n: int) -> list:
  """The first `n` records of `split` as (image, segments, title)."""
  from mimjax.data.builders import tfds_io
  path = tfds_io.find_dataset_dir(data_dir, name) if name else None
  if path is None:
    if os.path.exists(os.path.join(data_dir, 'dataset_info.json')):
      path = data_dir
    else:
      sets = [os.path.join(data_dir, d) for d in sorted(os.listdir(data_dir))
              if not d.startswith('.') and os.path.isdir(os.path.join(data_dir, d))]
      found = [tfds_io.find_dataset_dir(os.path.dirname(s), os.path.basename(s)) for s in sets]
      found = [f for f in found if f]
      if len(found) != 1:
        raise ValueError(f'{data_dir}: expected a data set dir (with dataset_info.json) or a '
                         f'data dir with exactly one data set (else pass --name); found {found}')
      path = found[0]
  builder = tfds_io.load_builder(path)
  if 'segments' not in builder.info.features:
    raise ValueError(f'{path} has no `segments` feature; run python -m mimjax.sam first')
  source = builder.as_data_source(split=split)
  names = builder.info.features['label'].names
  out = []
  for i in range(min(n, len(source))):
    ex = source[i]
    out.append((np.asarray(ex['image']), np.asarray(ex['segments']),
                f'{i}: {names[int(ex["label"])]}'[:24]))
  return out


def main(argv):
  del argv
  from mimjax import logs
  logs.quiet_library_logs()
  draw_grid(load_examples(_DATA_DIR.value, _NAME.value, _SPLIT.value, _N.value), _OUT.value)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  from mimjax import cli
  cli.run_absl(main, 'mimjax.sam.show')
