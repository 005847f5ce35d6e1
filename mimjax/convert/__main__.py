"""Convert between mimjax workdirs and PyTorch checkpoints (see docs/convert.md).

Export:  python -m mimjax.convert --workdir W --format timm --out model.safetensors [--verify]
             [--checkpoint_key teacher|student]      (DINO: the EMA teacher by default)
         python -m mimjax.convert --workdir W --format mae --out checkpoint.pth [--verify]
Import:  python -m mimjax.convert --from timm --in model.safetensors --workdir W
             [--variant B/16 --image_size 224 --num_heads 12 --checkpoint_key teacher]
         python -m mimjax.convert --from mae --in checkpoint-799.pth --workdir W
             [--decoder_num_heads 16]
A fine-tuned or linear-probe workdir exports as a timm classifier (head, fc_norm); --verify
then compares logits.
"""

import argparse
import os
import sys
from typing import Optional, Sequence

import ml_collections

from mimjax import cli
from mimjax import logs
from mimjax.convert import from_torch
from mimjax.convert import to_torch
from mimjax.models import vit as vit_lib

VERIFY_TOLERANCE = 1e-4  # fp32 max |timm − mimjax| on the final tokens


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """Command-line flags (export when --format is given, import when --from is given)."""
  parser = cli.ArgumentParser(prog='python -m mimjax.convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True,
                      help='mimjax workdir: read for export, written for import')
  parser.add_argument('--format', choices=('timm', 'mae'), help='export to this format')
  parser.add_argument('--out', help='export: output file (.safetensors, or .pth)')
  parser.add_argument('--step', type=int, help='export: checkpoint step (default: latest)')
  parser.add_argument('--verify', action='store_true',
                      help=f'export: compare the timm and JAX forward, fail if ≥ {VERIFY_TOLERANCE}')
  parser.add_argument('--from', dest='source', choices=('timm', 'mae'), help='import this format')
  parser.add_argument('--in', dest='inp', help='import: input checkpoint (.safetensors / .pth)')
  parser.add_argument('--variant', help='import: e.g. B/16 (default: inferred from shapes)')
  parser.add_argument('--image_size', type=int, help='import: checked against pos_embed')
  parser.add_argument('--num_heads', type=int, help='import: encoder heads (not in the shapes)')
  parser.add_argument('--decoder_num_heads', type=int,
                      help='import --from mae: decoder heads (default: recorded in the file by '
                           'our export, else 16 for the official 512-wide decoder)')
  parser.add_argument('--checkpoint_key',
                      help='export: teacher (default: DINO\'s EMA teacher, as its eval scripts) '
                           'or student; import: the entry of a training checkpoint (default: '
                           'teacher, else model, else state_dict)')
  parser.add_argument('--overwrite', action='store_true',
                      help='import: replace an existing W/params')
  args = parser.parse_args(argv)
  if (args.format is None) == (args.source is None):
    parser.error('give exactly one of --format (export) or --from (import)')
  if args.format and not args.out:
    parser.error('--format needs --out')
  if args.source and not args.inp:
    parser.error('--from needs --in')
  return args


def export(args: argparse.Namespace) -> int:
  """Workdir → timm state dict (.safetensors/.pth) or official MAE {'model': sd} (.pth)."""
  from mimjax import workdir
  from mimjax.objectives import pretrained
  workdir.check_output_file(args.out)  # before the work, not a traceback after it
  pre = pretrained.load_pretrained(args.workdir, args.checkpoint_key or 'teacher', args.step)
  config, encoder = pre.config, pre.encoder
  classifier = pre.objective.predict is not None
  for note in to_torch.dropped_params(encoder, config.model):
    print(f'note: {note}')
  if os.path.exists(args.out):
    print(f'note: replacing the existing {args.out}')
  heads = {'num_heads': vit_lib.model_dims(config.model)['num_heads']}
  name, kwargs = to_torch.timm_model_name_and_kwargs(config.model)
  if args.format == 'timm':
    state_dict = to_torch.vit_to_timm(encoder, config.model)
    if classifier:
      head, head_kwargs, unused = to_torch.classifier_to_timm(config, pre.params, pre.state)
      for key in unused:
        print(f'note: dropped {key} (the {head_kwargs["global_pool"]}-pool classifier does not '
              'use the final norm; timm has none)')
        del state_dict[key]
      state_dict.update(head)
      kwargs.update(head_kwargs)
    to_torch.save_state_dict(state_dict, args.out, metadata=heads)
    timm_sd = state_dict
  else:
    if classifier:
      raise ValueError(f'{args.workdir}: a {config.objective} workdir has no MAE decoder; '
                       'export it with --format timm')
    if not args.out.endswith('.pth'):
      raise ValueError(f'--out {args.out}: the MAE format is a torch pickle; use a .pth name')
    state_dict = to_torch.mae_to_torch(pre.params, config)
    heads['decoder_num_heads'] = int(config.model.decoder.num_heads)
    to_torch.save_state_dict(state_dict, args.out, wrap_model=True, metadata=heads)
    timm_sd = to_torch.timm_state_dict_of_mae(state_dict)
  print(f'wrote {args.out} ({pre.weights} weights): {len(state_dict)} tensors; '
        f'timm.create_model({name!r}, ' + ', '.join(f'{k}={v!r}' for k, v in kwargs.items()) + ')')
  if args.verify:
    if classifier:
      diff = to_torch.verify_classifier(pre.objective.predict, pre.params, pre.state,
                                        config.model, timm_sd, kwargs)
      what = 'max |timm logits - mimjax logits| / max(1, max |logits|)'
    else:
      diff = to_torch.verify_timm(encoder, config.model, timm_sd)
      what = 'max |timm forward_features - mimjax tokens|'
    ok = diff < VERIFY_TOLERANCE
    print(f'verify: {what} = {diff:.3e} ({"ok" if ok else "FAILED"}, tolerance '
          f'{VERIFY_TOLERANCE:g})')
    if not ok:
      return 1
  return 0


def import_(args: argparse.Namespace) -> int:
  """timm / MAE checkpoint → workdir (W/config.json + W/params) via `save_params`."""
  from etils import epath
  from mimjax import checkpoint
  from mimjax import workdir
  workdir.check_output_dir(args.workdir)
  root = epath.Path(args.workdir)
  if (root / 'checkpoints').exists() or ((root / 'params').exists() and not args.overwrite):
    raise ValueError(f'{args.workdir}: already holds checkpoints/ or params/; import into a new '
                     'workdir (or pass --overwrite to replace params/)')
  ckpt = from_torch.read_checkpoint(args.inp, args.checkpoint_key)
  for note in ckpt.notes:
    print(f'note: {note}')
  state_dict = ckpt.state_dict
  model_kwargs = dict(variant=args.variant, image_size=args.image_size,
                      num_heads=from_torch.heads_from('num_heads', args.num_heads, ckpt.heads))
  if args.source == 'timm':
    model = from_torch.infer_model_config(state_dict, **model_kwargs)
    vit, ignored = from_torch.timm_to_vit_with_notes(state_dict, model)
    for key in ignored:
      print(f'note: ignored {key} (classifier head, not part of the encoder)')
    config = ml_collections.ConfigDict({'model': model})
    params = {'encoder': vit}
  else:
    config = from_torch.infer_mae_config(
        state_dict, decoder_num_heads=from_torch.heads_from(
            'decoder_num_heads', args.decoder_num_heads, ckpt.heads), **model_kwargs)
    params = from_torch.torch_to_mae(state_dict, config)
  config.converted_from = os.path.abspath(args.inp)
  checkpoint.save_params(args.workdir, config, params)
  print(f'wrote {args.workdir}: model {vit_lib.describe_variant(config.model)} at '
        f'{config.model.image_size} px '
        f'(pos_embed {config.model.pos_embed}); use it with --config.init_from={args.workdir}')
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the CLI; bad input → one line on stderr and exit status 2."""
  args = parse_args(argv)
  logs.quiet_library_logs()
  try:
    return export(args) if args.format else import_(args)
  except (ValueError, OSError, KeyError) as e:
    print(f'mimjax.convert: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
