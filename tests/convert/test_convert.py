"""Flax ↔ PyTorch conversion: timm / MAE key maps, round trips, forward equality, errors, CLI."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import timm
import torch

from mimjax.convert import __main__ as cli
from mimjax.convert import from_torch
from mimjax.convert import keymap
from mimjax.convert import to_torch
from mimjax.models import layout, segment_bias
from mimjax.models.vit import ViT
from mimjax.objectives.mae import MAE


def _model_config(variant='mu/4', image_size=32, pos_embed='learned', **overrides):
  cfg = ml_collections.ConfigDict({
      'variant': variant, 'image_size': image_size, 'pos_embed': pos_embed, 'pool': 'cls',
      'dtype': 'float32', 'attention': 'xla', 'remat': False, 'drop_path': 0.0,
      'width': None, 'depth': None, 'num_heads': None, 'mlp_dim': None, 'patch_size': None,
      'segment_bias': segment_bias.default_config()})
  cfg.update(overrides)
  return cfg


def _vit_params(cfg, seed=0):
  size = cfg.image_size
  params = ViT(cfg).init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))['params']
  # Perturb every tensor so zero biases / unit norms cannot hide a transposition bug.
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: (np.asarray(x) + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), params)


def _mae_config():
  cfg = ml_collections.ConfigDict({'objective': 'mae', 'mask_ratio': 0.75, 'norm_pix': True,
                                   'model': _model_config(pos_embed='sincos')})
  cfg.model.decoder = ml_collections.ConfigDict(
      {'width': 32, 'depth': 1, 'num_heads': 4, 'mlp_dim': 128})
  return cfg


def _mae_params(cfg):
  n = (cfg.model.image_size // 4) ** 2
  ids = jnp.arange(n, dtype=jnp.int32)[None]
  size = cfg.model.image_size
  params = MAE(cfg).init(jax.random.key(0), jnp.zeros((1, size, size, 3)), ids, ids)['params']
  return jax.tree.map(np.asarray, params)


def _same(a, b):
  return jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)),
                                   a, b))


@pytest.fixture(scope='module')
def mu():
  cfg = _model_config()
  return cfg, _vit_params(cfg)


# --- key map and timm model construction -----------------------------------------------------

def test_timm_keys_and_layouts(mu):
  cfg, params = mu
  sd = to_torch.vit_to_timm(params, cfg)
  blk = params['blocks_0']
  np.testing.assert_array_equal(sd['blocks.0.attn.qkv.weight'], blk['attn']['qkv']['kernel'].T)
  np.testing.assert_array_equal(sd['blocks.0.norm1.weight'], blk['norm1']['scale'])
  np.testing.assert_array_equal(sd['patch_embed.proj.weight'],
                                params['patch_embed']['proj']['kernel'].transpose(3, 2, 0, 1))
  assert sd['patch_embed.proj.weight'].shape == (64, 3, 4, 4)
  assert sd['pos_embed'].shape == (1, 65, 64) and sd['cls_token'].shape == (1, 1, 64)
  assert not any(k.startswith(('head', 'decoder_')) or k == 'mask_token' for k in sd)


@pytest.mark.parametrize('variant,size,name,kwargs', [
    ('B/16', 224, 'vit_base_patch16_224', {}),
    ('S/16', 224, 'vit_small_patch16_224', {}),
    ('Ti/16', 224, 'vit_tiny_patch16_224', {}),
    ('L/16', 224, 'vit_large_patch16_224', {}),
    ('H/14', 224, 'vit_huge_patch14_224', {}),
    ('B/8', 224, 'vit_base_patch8_224', {}),
    ('B/16', 384, 'vit_base_patch16_384', {}),
    ('S/16', 64, 'vit_small_patch16_224', {'img_size': 64}),
    ('mu/4', 32, 'vit_tiny_patch16_224',
     {'patch_size': 4, 'img_size': 32, 'embed_dim': 64, 'depth': 2, 'num_heads': 4}),
])
def test_timm_model_name_and_kwargs(variant, size, name, kwargs):
  got = to_torch.timm_model_name_and_kwargs(_model_config(variant, size))
  assert got == (name, dict(kwargs, num_classes=0))


@pytest.mark.parametrize('variant,size', [('B/16', 224), ('H/14', 224), ('S/8', 96)])
def test_export_keys_and_shapes_equal_timm(variant, size):
  # Shapes only (eval_shape, meta device): full-size models cost no memory here.
  cfg = _model_config(variant, size)
  shapes = jax.eval_shape(lambda: ViT(cfg).init(jax.random.key(0),
                                                jnp.zeros((1, size, size, 3))))['params']
  flat = keymap.flatten(shapes)
  ours = {e.torch_key: keymap.torch_shape(flat[e.flax_path].shape, e.kind)
          for e in to_torch.vit_entries(cfg)}
  assert len(ours) == len(flat)  # every Flax tensor is exported
  name, kwargs = to_torch.timm_model_name_and_kwargs(cfg)
  with torch.device('meta'):
    model = timm.create_model(name, pretrained=False, **kwargs)
  assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- round trips and forward equality ----------------------------------------------------------

@pytest.mark.parametrize('variant,size,overrides', [('mu/4', 32, {}), ('S/16', 64, {'depth': 2})])
def test_timm_round_trip_and_forward(variant, size, overrides):
  cfg = _model_config(variant, size, **overrides)
  params = _vit_params(cfg)
  sd = to_torch.vit_to_timm(params, cfg)
  diff = to_torch.verify_timm(params, cfg, sd)  # loads into timm with strict=True
  print(f'{variant}@{size}: max |timm - jax| = {diff:.2e}')
  assert diff < 1e-4
  inferred = from_torch.infer_model_config(sd)
  assert (inferred.variant, inferred.image_size, inferred.depth) == (
      variant, size, overrides.get('depth'))
  assert _same(from_torch.timm_to_vit(sd, inferred), params)  # bit-identical


def test_sincos_pos_embed_detected(mu):
  cfg = _model_config(pos_embed='sincos')
  params = ViT(cfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  sd = to_torch.vit_to_timm(params, cfg)
  assert from_torch.infer_model_config(sd).pos_embed == 'sincos'
  assert from_torch.infer_model_config(to_torch.vit_to_timm(mu[1], mu[0])).pos_embed == 'learned'


def test_mae_round_trip_official_layout():
  cfg = _mae_config()
  params = _mae_params(cfg)
  sd = to_torch.mae_to_torch(params, cfg)
  assert sd['decoder_embed.weight'].shape == (32, 64)
  assert sd['decoder_pred.weight'].shape == (4 * 4 * 3, 32)
  assert sd['decoder_pos_embed'].shape == (1, 65, 32) and sd['mask_token'].shape == (1, 1, 32)
  assert 'decoder_blocks.0.attn.qkv.weight' in sd and 'decoder_norm.weight' in sd
  back_cfg = from_torch.infer_mae_config(sd, decoder_num_heads=4)
  assert back_cfg.model.decoder.to_dict() == cfg.model.decoder.to_dict()
  assert _same(from_torch.torch_to_mae(sd, back_cfg), params)
  # The timm view of an MAE export drops mask_token and decoder_* and still loads strictly.
  timm_sd = to_torch.timm_state_dict_of_mae(sd)
  assert to_torch.verify_timm(params['encoder'], cfg.model, timm_sd) < 1e-4


def test_scanned_layout_exports_and_imports_like_the_unrolled_one(mu):
  """model.scan_layers: export unstacks (the same timm / MAE state dicts), import stacks when
  the config scans, and the scanned model's forward matches timm's."""
  cfg, params = mu
  stacked = layout.stack_blocks(params)
  sd = to_torch.vit_to_timm(params, cfg)
  got = to_torch.vit_to_timm(stacked, cfg)
  assert sorted(got) == sorted(sd) and all(np.array_equal(got[k], sd[k]) for k in sd)
  scan_cfg = _model_config(scan_layers=True)
  back = from_torch.timm_to_vit(sd, scan_cfg)
  assert back['blocks']['attn']['qkv']['kernel'].shape == (2, 64, 192)
  assert _same(back, stacked)
  assert to_torch.verify_timm(back, scan_cfg, sd) < 1e-4
  mae_cfg = _mae_config()
  mae_params = _mae_params(mae_cfg)
  mae_sd = to_torch.mae_to_torch(mae_params, mae_cfg)
  scan_mae = _mae_config()
  scan_mae.model.scan_layers = True
  imported = from_torch.torch_to_mae(mae_sd, scan_mae)
  assert _same(imported, layout.stack_blocks(mae_params))
  exported = to_torch.mae_to_torch(imported, scan_mae)
  assert all(np.array_equal(exported[k], mae_sd[k]) for k in mae_sd)


def test_segment_bias_and_unknown_modules_dropped_with_note(mu):
  cfg, params = mu
  extra = dict(params, segment_bias={'u_pos': np.zeros((2, 4)), 'u_neg': np.zeros((2, 4))},
               proxy={'kernel': np.zeros((3, 3))})
  assert to_torch.vit_to_timm(extra, cfg).keys() == to_torch.vit_to_timm(params, cfg).keys()
  notes = to_torch.dropped_params(extra, cfg)
  assert len(notes) == 2 and 'u_pos' in notes[1] and 'MRE' in notes[1] and 'proxy' in notes[0]


# --- errors ----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def mu_sd(mu):
  return to_torch.vit_to_timm(mu[1], mu[0])


def test_missing_key_error(mu, mu_sd):
  sd = {k: v for k, v in mu_sd.items() if k != 'blocks.1.mlp.fc2.bias'}
  with pytest.raises(ValueError, match=r"missing keys \(1\): \['blocks.1.mlp.fc2.bias'\]"):
    from_torch.timm_to_vit(sd, mu[0])


def test_wrong_shape_error(mu, mu_sd):
  sd = dict(mu_sd, **{'blocks.0.attn.proj.weight': np.zeros((64, 32), np.float32)})
  with pytest.raises(ValueError, match=r'blocks.0.attn.proj.weight: expected \(64, 64\), got '
                                       r'\(64, 32\)'):
    from_torch.timm_to_vit(sd, mu[0])


def test_unexpected_key_error_and_mae_hint(mu, mu_sd):
  sd = dict(mu_sd, mask_token=np.zeros((1, 1, 32), np.float32))
  with pytest.raises(ValueError, match=r"(?s)unexpected keys \(1\): \['mask_token'\].*--from mae"):
    from_torch.timm_to_vit(sd, mu[0])
  # A classifier head is the one thing ignored (and reported to the CLI).
  _, ignored = from_torch.timm_to_vit_with_notes(
      dict(mu_sd, **{'head.weight': np.zeros((10, 64)), 'head.bias': np.zeros(10)}), mu[0])
  assert ignored == ['head.bias', 'head.weight']


def test_variant_and_image_size_mismatch_errors(mu_sd):
  with pytest.raises(ValueError, match='--variant B/16 does not match'):
    from_torch.infer_model_config(mu_sd, variant='B/16')
  with pytest.raises(ValueError, match='--image_size 64 does not match'):
    from_torch.infer_model_config(mu_sd, image_size=64)
  assert from_torch.infer_model_config(mu_sd, variant='mu/4', image_size=32).variant == 'mu/4'


def test_mae_import_without_decoder_error(mu_sd):
  with pytest.raises(ValueError, match='no decoder_\\* keys.*--from timm'):
    from_torch.torch_to_mae(mu_sd, _mae_config())


def test_load_checkpoint_unwraps_and_strips(tmp_path, mu_sd):
  path = str(tmp_path / 'ckpt.pth')
  torch.save({'model': {f'module.backbone.{k}': torch.tensor(v) for k, v in mu_sd.items()},
              'epoch': 3}, path)
  loaded = from_torch.load_torch_checkpoint(path)
  assert loaded.keys() == mu_sd.keys()
  with pytest.raises(FileNotFoundError, match='nope.pth: checkpoint not found'):
    from_torch.load_torch_checkpoint(str(tmp_path / 'nope.pth'))


def test_truncated_or_disguised_safetensors_is_one_line(tmp_path, mu_sd):
  from safetensors.numpy import save_file
  good = str(tmp_path / 'good.safetensors')
  save_file({k: np.ascontiguousarray(v) for k, v in mu_sd.items()}, good)
  data = open(good, 'rb').read()
  (tmp_path / 'cut.safetensors').write_bytes(data[:len(data) // 2])
  torch.save({'model': {}}, str(tmp_path / 'pickle.safetensors'))  # a torch file, renamed
  for name in ('cut.safetensors', 'pickle.safetensors'):
    with pytest.raises(ValueError, match=f'{name}: cannot read as .safetensors') as e:
      from_torch.load_torch_checkpoint(str(tmp_path / name))
    assert '\n' not in str(e.value)


# --- CLI end to end (needs mimjax.checkpoint) --------------------------------------------

def test_cli_export_verify_import_round_trip(tmp_path, capsys):
  from mimjax import checkpoint
  cfg = _mae_config()
  params = _mae_params(cfg)
  src = str(tmp_path / 'src')
  checkpoint.save_params(src, cfg, params)

  out = str(tmp_path / 'model.safetensors')
  assert cli.main(['--workdir', src, '--format', 'timm', '--out', out, '--verify']) == 0
  printed = capsys.readouterr().out
  assert 'verify: max' in printed and 'ok' in printed
  from safetensors.torch import load_file
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0, patch_size=4,
                            img_size=32, embed_dim=64, depth=2, num_heads=4)
  model.load_state_dict(load_file(out), strict=True)

  pth = str(tmp_path / 'mae.pth')
  assert cli.main(['--workdir', src, '--format', 'mae', '--out', pth, '--verify']) == 0
  assert 'decoder_pred.weight' in torch.load(pth, weights_only=True)['model']

  dst = str(tmp_path / 'imported_timm')
  assert cli.main(['--from', 'timm', '--in', out, '--workdir', dst]) == 0
  back = checkpoint.restore_params(dst)
  assert _same(back['encoder'], params['encoder'])
  assert checkpoint.load_config(dst).model.variant == 'mu/4'

  dst_mae = str(tmp_path / 'imported_mae')
  assert cli.main(['--from', 'mae', '--in', pth, '--workdir', dst_mae,
                   '--decoder_num_heads', '4']) == 0
  assert _same(checkpoint.restore_params(dst_mae), params)
  # Re-export of the imported MAE workdir gives the same file contents.
  pth2 = str(tmp_path / 'mae2.pth')
  assert cli.main(['--workdir', dst_mae, '--format', 'mae', '--out', pth2]) == 0
  a = torch.load(pth, weights_only=True)['model']
  b = torch.load(pth2, weights_only=True)['model']
  assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_errors_leave_nothing_behind(tmp_path, capsys):
  missing = str(tmp_path / 'missing.pth')
  dst = str(tmp_path / 'dst')
  assert cli.main(['--from', 'timm', '--in', missing, '--workdir', dst]) == 2
  assert 'missing.pth: checkpoint not found' in capsys.readouterr().err
  assert not os.path.exists(os.path.join(dst, 'params'))

  bad = str(tmp_path / 'bad.pth')
  torch.save({'cls_token': torch.zeros(1, 1, 64)}, bad)
  assert cli.main(['--from', 'timm', '--in', bad, '--workdir', dst]) == 2
  assert "missing key 'patch_embed.proj.weight'" in capsys.readouterr().err
  assert not os.path.exists(os.path.join(dst, 'params'))

  assert cli.main(['--workdir', str(tmp_path / 'nowhere'), '--format', 'timm',
                   '--out', str(tmp_path / 'x.safetensors')]) == 2
  assert 'config.json' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'x.safetensors')
  assert not [f for f in os.listdir(tmp_path) if f.startswith('.x.safetensors')]  # no temp file

  (tmp_path / 'file').write_text('x')
  assert cli.main(['--from', 'timm', '--in', bad, '--workdir', str(tmp_path / 'file')]) == 2
  assert 'file: exists and is not a directory' in capsys.readouterr().err


def test_cli_usage_errors():
  with pytest.raises(SystemExit):
    cli.parse_args(['--workdir', 'W'])  # neither --format nor --from
  with pytest.raises(SystemExit):
    cli.parse_args(['--workdir', 'W', '--format', 'timm'])  # no --out


def test_failed_write_leaves_no_file(tmp_path, mu_sd):
  out = tmp_path / 'model.safetensors'
  with pytest.raises(ValueError, match='use .pth'):
    to_torch.save_state_dict(mu_sd, str(out), wrap_model=True)
  bad = dict(mu_sd, cls_token=object())  # not an array: the writer fails midway
  with pytest.raises(Exception):
    to_torch.save_state_dict(bad, str(out))
  assert os.listdir(tmp_path) == []


# --- official training checkpoints (weights_only with argparse.Namespace) ---------------------

def _optimizer_state(tensors):
  params = [torch.nn.Parameter(v.detach().clone()) for v in list(tensors.values())[:2]]
  opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
  sum(p.sum() for p in params).backward()
  opt.step()
  return opt.state_dict()


def test_official_mae_training_checkpoint_imports(tmp_path, mu):
  import argparse
  cfg = _mae_config()
  params = _mae_params(cfg)
  sd = {k: torch.tensor(v) for k, v in to_torch.mae_to_torch(params, cfg).items()}
  # As MAE's util/misc.save_model writes checkpoint-<epoch>.pth.
  path = str(tmp_path / 'checkpoint-799.pth')
  torch.save({'model': sd, 'optimizer': _optimizer_state(sd), 'epoch': 799,
              'scaler': {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5,
                         'growth_interval': 2000, '_growth_tracker': 17},
              'args': argparse.Namespace(model='mae_vit_base_patch16', input_size=224,
                                         mask_ratio=0.75, norm_pix_loss=True, blr=1.5e-4,
                                         output_dir='./output_dir')}, path)
  with pytest.raises(Exception, match='Namespace'):  # what plain weights_only refuses
    torch.load(path, weights_only=True)
  dst = str(tmp_path / 'mae')
  assert cli.main(['--from', 'mae', '--in', path, '--workdir', dst,
                   '--decoder_num_heads', '4']) == 0
  from mimjax import checkpoint
  assert _same(checkpoint.restore_params(dst), params)


class _NotAllowed:
  pass


def test_official_dino_checkpoint_teacher_by_default(tmp_path, mu, mu_sd, capsys):
  import argparse
  cfg, _ = mu
  student_sd = to_torch.vit_to_timm(_vit_params(cfg, seed=1), cfg)
  head = {'head.mlp.0.weight': np.zeros((8, 64), np.float32),
          'head.last_layer.weight_g': np.ones((16, 1), np.float32)}
  t = lambda sd, prefix: {prefix + k: torch.tensor(v) for k, v in sd.items()}
  # As DINO's main_dino.py saves checkpoint.pth (student under DDP: module.backbone./module.head.).
  path = str(tmp_path / 'checkpoint.pth')
  torch.save({'student': {**t(student_sd, 'module.backbone.'), **t(head, 'module.')},
              'teacher': {**t(mu_sd, 'backbone.'), **t(head, '')},
              'optimizer': _optimizer_state(t(mu_sd, '')), 'epoch': 100,
              'args': argparse.Namespace(arch='vit_small', patch_size=16, out_dim=65536,
                                         local_crops_scale=(0.05, 0.4)),
              'dino_loss': {'center': torch.zeros(1, 16)}}, path)
  got = from_torch.read_checkpoint(path)
  assert got.state_dict.keys() == mu_sd.keys() and _same(got.state_dict, mu_sd)
  assert 'DINO projection head' in got.notes[0]
  assert _same(from_torch.load_torch_checkpoint(path, 'student'), student_sd)
  with pytest.raises(ValueError, match="'ema' not found; the checkpoint holds the entries "
                                       r"\['student', 'teacher', 'optimizer', 'dino_loss'\]"):
    from_torch.read_checkpoint(path, 'ema')
  dst = str(tmp_path / 'dino')
  assert cli.main(['--from', 'timm', '--in', path, '--workdir', dst]) == 0
  assert 'projection head' in capsys.readouterr().out
  from mimjax import checkpoint
  assert _same(checkpoint.restore_params(dst)['encoder'], mu[1])
  # Only argparse.Namespace is allowed: any other pickled class is still refused.
  bad = str(tmp_path / 'bad.pth')
  torch.save({'model': t(mu_sd, ''), 'args': _NotAllowed()}, bad)
  with pytest.raises(ValueError, match='weights_only=True'):
    from_torch.read_checkpoint(bad)


def test_decoder_heads_recorded_or_refused(tmp_path):
  cfg = _mae_config()  # a 32-wide decoder with 4 heads
  sd = to_torch.mae_to_torch(_mae_params(cfg), cfg)
  with pytest.raises(ValueError, match='does not record its head count: pass --decoder_num_heads'):
    from_torch.infer_mae_config(sd)
  from mimjax import checkpoint
  src = str(tmp_path / 'src')
  checkpoint.save_params(src, cfg, _mae_params(cfg))
  pth = str(tmp_path / 'mae.pth')
  assert cli.main(['--workdir', src, '--format', 'mae', '--out', pth]) == 0
  dst = str(tmp_path / 'back')
  assert cli.main(['--from', 'mae', '--in', pth, '--workdir', dst]) == 0  # heads from the file
  assert checkpoint.load_config(dst).model.decoder.num_heads == 4
  assert cli.main(['--from', 'mae', '--in', pth, '--workdir', str(tmp_path / 'x'),
                   '--decoder_num_heads', '16']) == 2
  st = str(tmp_path / 'enc.safetensors')
  assert cli.main(['--workdir', src, '--format', 'timm', '--out', st]) == 0
  assert from_torch.read_checkpoint(st).heads == {'num_heads': 4}


# --- fine-tuned and linear-probe workdirs → timm classifiers ---------------------------------

@pytest.fixture(scope='module')
def mae_workdir(tmp_path_factory):
  from configs import mae as mae_config
  from mimjax import checkpoint
  config = mae_config.get_config('tiny')
  workdir = str(tmp_path_factory.mktemp('mae'))
  checkpoint.save_params(workdir, config, _mae_params(config))
  return workdir


def _classifier_workdir(tmp_path, mae_workdir, name, arg):
  """A fine-tune / probe train checkpoint with random (not initial) head and BN statistics."""
  import importlib
  from mimjax.objectives import base
  from mimjax import checkpoint
  config = importlib.import_module(f'configs.eval.{name}').get_config(arg)
  config.pretrained = mae_workdir
  objective = base.load(config.objective).make(config)
  shapes = jax.eval_shape(objective.init, jax.random.key(0),
                          {'image': np.zeros((1, 32, 32, 3), np.uint8)})
  rng = np.random.default_rng(4)
  params, state = jax.tree.map(
      lambda x: (0.5 + np.abs(rng.standard_normal(x.shape))).astype(x.dtype), shapes)
  params = dict(params, encoder=checkpoint.restore_params(mae_workdir)['encoder'])
  workdir = str(tmp_path / name)
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(2, {'params': params, 'opt_state': {'count': np.zeros((), np.int32)},
                'state': state, 'step': np.asarray(2, np.int32)}, {}, config, force=True)
  ckpt.close()
  checkpoint.write_config(workdir, config)
  return workdir, objective, params, state


@pytest.mark.parametrize('name,arg,pool', [('finetune', 'tiny,pool=mean', 'avg'),
                                           ('finetune', 'tiny,pool=cls', 'token'),
                                           ('linear', 'tiny,pool=cls', 'token'),
                                           ('linear', 'tiny,pool=mean', 'avg')])
def test_classifier_workdir_exports_to_timm_with_logits(tmp_path, mae_workdir, capsys, name, arg,
                                                        pool):
  from mimjax.data.normalize import normalize_images
  workdir, objective, params, state = _classifier_workdir(tmp_path, mae_workdir, name, arg)
  out = str(tmp_path / 'ft.safetensors')
  assert cli.main(['--workdir', workdir, '--format', 'timm', '--out', out, '--verify']) == 0
  printed = capsys.readouterr().out
  assert 'verify: max |timm logits - mimjax logits|' in printed and 'ok' in printed
  from safetensors.torch import load_file
  sd = load_file(out)
  assert sd['head.weight'].shape == (10, 64) and ('fc_norm.weight' in sd) == (pool == 'avg')
  if name == 'linear' and pool == 'avg':  # the probe's untrained fc_norm
    assert (sd['fc_norm.weight'] == 1).all() and (sd['fc_norm.bias'] == 0).all()
  assert ('norm.weight' in sd) == (pool == 'token')
  # Independently of --verify: timm as a user builds it, against the trained forward.
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=10,
                            global_pool=pool, patch_size=4, img_size=32, embed_dim=64, depth=2,
                            num_heads=4)
  model.load_state_dict(sd, strict=True)
  images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), np.uint8)
  with torch.no_grad():
    got = model.eval()(torch.from_numpy(np.asarray(normalize_images(images)).transpose(0, 3, 1, 2)
                                        .copy())).numpy()
  want = np.asarray(objective.predict(params, state, images))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert cli.main(['--workdir', workdir, '--format', 'mae', '--out', str(tmp_path / 'x.pth')]) == 2
  assert 'export it with --format timm' in capsys.readouterr().err


def test_probe_bn_folding_by_hand():
  config = ml_collections.ConfigDict({'objective': 'linear_probe', 'model': _model_config(),
                                      'probe': {'pool': 'cls', 'layer': -1},
                                      'pretrained': 'W'})
  rng = np.random.default_rng(0)
  kernel, bias = rng.standard_normal((64, 3)), rng.standard_normal(3)
  mean, var = rng.standard_normal(64), rng.random(64) + 0.1
  params = {'head': {'linear': {'kernel': kernel, 'bias': bias}}}
  state = {'batch_stats': {'bn': {'mean': mean, 'var': var}}}
  sd, kwargs, dropped = to_torch.classifier_to_timm(config, params, state)
  x = rng.standard_normal((5, 64))
  want = ((x - mean) / np.sqrt(var + 1e-6)) @ kernel + bias  # BatchNorm1d(affine=False) → Linear
  np.testing.assert_allclose(x @ sd['head.weight'].T + sd['head.bias'], want, rtol=1e-5)
  assert kwargs == {'num_classes': 3, 'global_pool': 'token'} and dropped == []
  config.probe.pool = 'mean'  # same folding; the pooled features go through fc_norm (1, 0)
  sd, kwargs, dropped = to_torch.classifier_to_timm(config, params, state)
  np.testing.assert_allclose(x @ sd['head.weight'].T + sd['head.bias'], want, rtol=1e-5)
  assert kwargs == {'num_classes': 3, 'global_pool': 'avg'}
  assert (sd['fc_norm.weight'] == 1).all() and (sd['fc_norm.bias'] == 0).all()
  assert dropped == ['norm.weight', 'norm.bias']
  for probe in ({'pool': 'abmilp'}, {'pool': 'mean', 'layer': 7}, {'pool': 'cls', 'norm': 'ln'}):
    config.probe = {'pool': 'cls', 'layer': -1, **probe}
    with pytest.raises(ValueError, match='has no timm counterpart'):
      to_torch.classifier_to_timm(config, params, state)


class _RunsCode:
  def __reduce__(self):
    return (os.system, ('touch pwned',))


def test_export_out_errors_file_mode_replacement_and_malicious_pickle(tmp_path, capsys,
                                                                      monkeypatch):
  """Issue 28.5/28.7: --out a directory or under a file was a 16-17 line traceback after the
  work; exported files were mode 0600; an existing --out was replaced without a word; a
  malicious .pth was our line plus torch's page of advice (to retry with weights_only=False)."""
  from mimjax import checkpoint
  cfg = _mae_config()
  src = str(tmp_path / 'src')
  checkpoint.save_params(src, cfg, _mae_params(cfg))
  (tmp_path / 'file').write_text('x')
  for out, message in [(str(tmp_path), f'--out {tmp_path}: is a directory; expected a file name'),
                       (str(tmp_path / 'file' / 'm.safetensors'),
                        f'--out {tmp_path}/file/m.safetensors: {tmp_path}/file is a file, not a '
                        'directory')]:
    assert cli.main(['--workdir', src, '--format', 'timm', '--out', out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'mimjax.convert: error: {message}') and err.count('\n') == 1, err
  out = str(tmp_path / 'm.safetensors')
  assert cli.main(['--workdir', src, '--format', 'timm', '--out', out]) == 0
  umask = os.umask(0o022)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask
  assert 'replacing' not in capsys.readouterr().out
  assert cli.main(['--workdir', src, '--format', 'timm', '--out', out]) == 0
  assert f'note: replacing the existing {out}' in capsys.readouterr().out
  evil = str(tmp_path / 'evil.pth')
  torch.save({'model': _RunsCode()}, evil)
  monkeypatch.chdir(tmp_path)
  assert cli.main(['--from', 'timm', '--in', evil, '--workdir', str(tmp_path / 'dst')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'weights_only set to False' not in err, err
  assert err.startswith(f'mimjax.convert: error: {evil}: cannot read as a torch checkpoint '
                        '(weights_only=True, argparse.Namespace allowed): Trying to load unsupported GLOBAL ')
  assert not os.path.exists(tmp_path / 'pwned')
