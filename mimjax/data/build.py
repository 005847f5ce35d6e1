"""Prepare a TFDS data set: `python -m mimjax.data.build NAME --source DIR --data_dir D`.

NAME: imagenet2012 | imagenet100 (manual-download layout), image_folder (class subfolders),
digits | photos (embedded, no --source). Writes D/NAME/1.0.0/ atomically; bad input → one
error line naming the file, exit status 1, nothing left in D.
"""

import argparse
import os
import sys
from typing import Optional, Sequence

from mimjax import cli
from mimjax.data.builders import embedded, folder, tfds_io

NAMES = ('imagenet2012', 'imagenet100', 'image_folder') + embedded.EMBEDDED


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """The CLI flags."""
  p = cli.ArgumentParser(prog='python -m mimjax.data.build', description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('name', choices=NAMES)
  p.add_argument('--source', help='input directory (not needed for digits/photos)')
  p.add_argument('--data_dir', default=None,
                 help=f'output TFDS dir (default ${tfds_io.ENV_DATA_DIR} or ~/.cache/mimjax/tfds)')
  p.add_argument('--resize_shorter', type=int, default=None,
                 help='downscale so the shorter side is at most this (e.g. 256); default: keep')
  p.add_argument('--skip_corrupt', action='store_true',
                 help='skip unreadable images (listed at the end and in skipped_files.txt)')
  p.add_argument('--num_workers', type=int, default=os.cpu_count() or 1,
                 help='decode/resize processes (0 = in-process)')
  p.add_argument('--split_val_fraction', type=float, default=0.0,
                 help='image_folder without a val folder: hold out this fraction per class')
  p.add_argument('--seed', type=int, default=0, help='seed of the validation hold-out')
  p.add_argument('--name_override', default=None,
                 help='image_folder: data set name to write (default image_folder)')
  p.add_argument('--overwrite', action='store_true', help='replace an existing build')
  return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[str, folder.Report]:
  """Builds per `args`; returns (output dir, report). Raises BuildError on bad input."""
  if args.name in embedded.EMBEDDED:
    return embedded.build_embedded(args.name, args.data_dir, overwrite=args.overwrite), folder.Report()
  if not args.source:
    raise tfds_io.BuildError(f'{args.name} needs --source DIR')
  if not 0 <= args.split_val_fraction < 1:
    raise tfds_io.BuildError(f'--split_val_fraction must be in [0, 1), got {args.split_val_fraction}')
  if args.name == 'image_folder':
    classes, task_splits = folder.image_folder_splits(args.source, args.split_val_fraction,
                                                      args.seed)
    splits = {k: (v, len(v)) for k, v in task_splits.items()}
    name = args.name_override or 'image_folder'
  else:
    classes, splits = folder.imagenet_splits(args.source, args.name)
    name = args.name
  return folder.build_from_tasks(
      args.data_dir, name, classes, splits, skip_corrupt=args.skip_corrupt,
      num_workers=args.num_workers, resize_shorter=args.resize_shorter,
      overwrite=args.overwrite, description=f'{args.name} from {args.source}')


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI entry point; returns the exit status."""
  args = parse_args(argv)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()  # ours (per split, img/s) is the one that matters
  try:
    path, report = build(args)
  except (tfds_io.BuildError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print('interrupted; nothing was written', file=sys.stderr)
    return 130
  sizes = tfds_io.split_sizes(path)
  print(f'wrote {path}: ' + ', '.join(f'{k}={v}' for k, v in sorted(sizes.items())))
  if report.skipped:
    print(f'skipped {len(report.skipped)} corrupt file(s) (list in {path}/skipped_files.txt):')
    for line in report.skipped:
      print(f'  {line}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
