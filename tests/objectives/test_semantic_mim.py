"""SemanticMIM objective + BEiT/MaskFeat baselines: tiny configs train, loss by hand, errors."""

import json
import math
import os
import re

import jax
import numpy as np
import pytest

from configs import beit as beit_config
from configs import maskfeat as maskfeat_config
from configs import semantic_mim as smim_config
from mimjax import hog as hog_lib
from mimjax import masking
from mimjax import optim
from mimjax.data.normalize import normalize_images
from mimjax.objectives import semantic_mim
from mimjax.train import trainer
from mimjax.tree import path_name


def _tiny(module, arg='tiny', **overrides):
  config = module.get_config(arg)
  config.batch_size = 16
  config.total_steps = 2
  config.warmup_steps = 1
  config.log_every = 1
  config.checkpoint_every = 2
  config.async_checkpoint = False
  config.mesh.devices = 1
  config.tokenizer.fit_images = 32
  config.update_from_flattened_dict(overrides)  # keys may be dotted: 'data.name'
  return config


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['loss'] for line in f]


@pytest.mark.parametrize('module,arg', [(smim_config, 'tiny'), (beit_config, 'tiny')])
def test_tiny_configs_train_with_finite_loss(tmp_path, module, arg):
  record = trainer.train_and_evaluate(_tiny(module, arg), str(tmp_path))
  losses = _losses(tmp_path)
  assert record['step'] == 2 and len(losses) == 2 and np.all(np.isfinite(losses))


@pytest.mark.slow
@pytest.mark.parametrize('module,arg', [(maskfeat_config, 'tiny'),
                                        (smim_config, 'tiny,base=beit'),
                                        (smim_config, 'tiny,recipe=repo')])
def test_other_tiny_configs_train_with_finite_loss(tmp_path, module, arg):
  trainer.train_and_evaluate(_tiny(module, arg), str(tmp_path))
  assert np.all(np.isfinite(_losses(tmp_path)))


def _batch(b=4):
  rng = np.random.default_rng(0)
  return {'image': rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)}


@pytest.mark.parametrize('proxy', [True, False])
def test_loss_equals_hand_computed_masked_hog_mse(proxy):
  config = _tiny(smim_config) if proxy else _tiny(maskfeat_config)
  obj = semantic_mim.make(config)
  batch = _batch()
  params, state = jax.jit(obj.init)(jax.random.key(0), batch)
  rng = jax.random.key(7)
  value, (_, metrics) = jax.jit(obj.loss)(params, state, batch, rng, 0)
  # Re-derive: same mask draw, model predictions, HOG targets, MSE over masked patches.
  mask_rng, _ = jax.random.split(rng)
  m = masking.make_mask(config, mask_rng, 4, 64)
  images = normalize_images(batch['image'])
  model = semantic_mim.SemanticMIM(config, 108)
  pred = np.asarray(jax.jit(lambda p: model.apply({'params': p}, images, m))(params), np.float64)
  hog = np.asarray(jax.jit(hog_lib.hog_targets, static_argnums=(1, 2, 3, 4))(images, 4, 9, 2, 4),
                   np.float64)  # jit: eagerly every HOG op compiles on its own
  mask = np.asarray(m.mask)
  if proxy:
    ids = np.asarray(masking.masked_ids(m))
    assert pred.shape == (4, 39, 108) and ids.shape == (4, 39)  # ⌈64 · 0.6⌉ = 39
    expected = np.mean([np.mean((pred[b] - hog[b, ids[b]]) ** 2) for b in range(4)])
  else:
    assert pred.shape == (4, 64, 108) and mask.sum() == 4 * 26  # round(64 · 0.4)
    per_patch = np.mean((pred - hog) ** 2, axis=-1)
    expected = (per_patch * mask).sum() / mask.sum()
  # rel 1e-3: a pixel whose HOG angle sits on a bin edge may fall either side under different
  # XLA fusions; a wrong mask, gather or weighting moves the loss by far more.
  assert float(value) == pytest.approx(expected, rel=1e-3)
  assert float(metrics['mim_loss']) == float(value)


def test_export_and_encode_for_eval_read_layer_7_or_last():
  config = _tiny(smim_config)
  config.model.depth = 8
  obj = semantic_mim.make(config)
  params, _ = jax.jit(obj.init)(jax.random.key(0), _batch(1))  # eager: a compile per op
  assert obj.encoder == ('backbone', 'encoder')
  vit_cfg, enc = semantic_mim.export_encoder(config, params)
  assert vit_cfg.num_prefix_tokens == 8 and 'mask_token' not in enc
  images = normalize_images(_batch(2)['image'])
  assert config.probe_layer == 7
  from mimjax.models.vit import ViT
  # One compiled program for the three forwards (eagerly, each op compiles on its own).
  (last, aux), probe, probe_last = jax.jit(lambda p, e, x: (
      ViT(vit_cfg).apply({'params': e}, x, return_layers=True),
      semantic_mim.encode_for_eval(config, p, x),
      semantic_mim.encode_for_eval(config, p, x, -1)))(params, enc, images)
  np.testing.assert_allclose(probe, aux['layers'][6], rtol=1e-6, atol=1e-6)
  # -1: the repo's probe reads the last block without the final norm (final_norm=False).
  np.testing.assert_allclose(probe_last, aux['layers'][-1], rtol=1e-6, atol=1e-6)
  assert not np.allclose(aux['layers'][-1], last, atol=1e-3)
  assert smim_config.get_config('tiny,recipe=repo').probe_layer == -1
  assert smim_config.get_config('vit_b,recipe=repo').mask_ratio == 0.8
  assert smim_config.get_config('vit_b,recipe=repo,base=beit').mask_ratio == 0.6


def test_paper_rows_and_baselines():
  c = smim_config.get_config('vit_b,in1k,300ep')
  assert (c.model.variant, c.model.num_prefix_tokens, c.model.proxy, c.mask_ratio, c.masking,
          c.target, c.total_epochs, c.batch_size) == ('B/16', 8, True, 0.6, 'random', 'hog',
                                                      300, 2048)
  b = smim_config.get_config('vit_b,in1k,300ep,base=beit')
  assert (b.target, b.optim.clip_norm, b.model.drop_path) == ('tokens', 3.0, 0.1)
  # The paper's reproduced baselines mask random patches (§4.3; SimMIMMaskGeneratorOurs with
  # 16-px mask patches: ⌈196·0.4⌉ = 79), not the original papers' blocks.
  mf = maskfeat_config.get_config()
  assert (mf.model.proxy, mf.model.num_prefix_tokens, mf.masking, mf.mask_ratio,
          mf.optim.clip_norm) == (False, 1, 'random', 0.4, 0.02)
  bt = beit_config.get_config()
  assert bt.masking == 'random' and bt.mask_ratio == 0.4
  for cfg in (mf, bt):
    assert masking.num_masked(cfg, 196) == math.ceil(196 * 0.4) == 79
    m = masking.make_mask(cfg, jax.random.key(0), 64, 196)
    np.testing.assert_array_equal(np.asarray(m.mask).sum(1), 79)
    # Uniform over patches: every patch is masked about 40% of the time (64 samples × 20).
    freq = np.mean([np.asarray(masking.make_mask(cfg, jax.random.key(i), 64, 196).mask)
                    for i in range(20)], axis=(0, 1))
    assert np.abs(freq - 79 / 196).max() < 0.1
  # The original papers' block masks stay available for the baselines only.
  mfb = maskfeat_config.get_config('vit_b,in1k,300ep,masking=block')
  assert (mfb.masking, mfb.block_mask.min_patches, masking.num_masked(mfb, 196)) == (
      'block', 15, 78)
  btb = beit_config.get_config('vit_b,in1k,300ep,masking=block')
  assert masking.num_masked(btb, 196) == 75 and btb.block_mask.min_patches == 16
  with pytest.raises(ValueError, match='masking=block'):
    smim_config.get_config('vit_b,masking=block')


def test_bad_config_errors_name_the_key(tmp_path):
  with pytest.raises(ValueError, match='config.target'):
    semantic_mim.make(_tiny(smim_config, target='clip'))
  with pytest.raises(ValueError, match='config.masking'):
    semantic_mim.make(_tiny(smim_config, masking='grid'))
  with pytest.raises(ValueError, match='model.num_prefix_tokens'):
    semantic_mim.make(_tiny(smim_config, **{'model.num_prefix_tokens': -1}))
  with pytest.raises(ValueError, match='config.tokenizer.codebook'):
    semantic_mim.make(_tiny(beit_config, **{'tokenizer.fit_on_start': False}))
  bad = tmp_path / 'codebook.npy'
  np.save(bad, np.zeros((4, 27), np.float32))
  with pytest.raises(ValueError, match='config.tokenizer.codebook'):
    semantic_mim.make(_tiny(beit_config, **{'tokenizer.codebook': str(bad)}))


def mmpretrain_decays(name: str, ndim: int, paramwise_cfg: dict) -> bool:
  """mmengine DefaultOptimWrapperConstructor: does this param get weight decay? (custom_keys
  by substring first; then bias / norm / flat (1-D) multipliers)."""
  for key, value in paramwise_cfg.get('custom_keys', {}).items():
    if key in name:
      return value['decay_mult'] != 0
  is_norm = '.ln' in name  # every norm layer of these backbones is named ln*
  mult = 1.0
  if name.endswith('.bias') and not is_norm and 'bias_decay_mult' in paramwise_cfg:
    mult *= paramwise_cfg['bias_decay_mult']
  if is_norm and 'norm_decay_mult' in paramwise_cfg:
    mult *= paramwise_cfg['norm_decay_mult']
  elif ndim == 1 and 'flat_decay_mult' in paramwise_cfg:
    mult *= paramwise_cfg['flat_decay_mult']
  return mult != 0


# yyk-wew/SemanticMIM configs/{maskfeat,beit}/*_pretrain.py (same for bottleneck and baseline).
PARAMWISE = {
    'maskfeat': dict(bias_decay_mult=0.0, norm_decay_mult=0.0, flat_decay_mult=0.0,
                     custom_keys={'mask_token': dict(decay_mult=0.)}),
    'beit': dict(custom_keys={k: dict(decay_mult=0.0) for k in (
        '.ln', '.bias', 'q_bias', 'v_bias', '.cls_token', '.pos_embed', '.gamma')}),
}


def mm_name(path: str) -> str:
  """mimjax SemanticMIM param path → the official mmpretrain name."""
  name = re.sub(r'^backbone/(encoder/)?', 'backbone/', path)
  name = re.sub(r'(blocks|extra_layers)_(\d+)', lambda m: (
      'layers' if m.group(1) == 'blocks' else 'extra_layers') + '.' + m.group(2), name)
  name = name.replace('norm1', 'ln1').replace('norm2', 'ln2').replace('mlp/fc1', 'ffn.0')
  name = name.replace('mlp/fc2', 'ffn.1').replace('backbone/norm/', 'backbone/ln1/')
  name = re.sub(r'/(kernel|scale)$', '/weight', name).replace('reg_token', 'cls_token')
  return name.replace('/', '.')


@pytest.mark.parametrize('module,arg,base', [(smim_config, 'tiny', 'maskfeat'),
                                             (smim_config, 'tiny,base=beit', 'beit'),
                                             (maskfeat_config, 'tiny', 'maskfeat'),
                                             (beit_config, 'tiny', 'beit')])
def test_weight_decay_groups_match_official_paramwise_cfg(module, arg, base):
  config = _tiny(module, arg)
  obj = semantic_mim.make(config)
  params = jax.eval_shape(lambda: obj.init(jax.random.key(0), _batch(1))[0])
  mask = optim.decay_mask(params, tuple(config.optim.no_decay))
  got = {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  shapes = {path_name(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  want = {k: mmpretrain_decays(mm_name(k), len(shapes[k]), PARAMWISE[base]) for k in shapes}
  assert got == want
  # The cases that differ between the two frameworks.
  enc = 'backbone/encoder/'
  assert got[enc + 'pos_embed'] == got[enc + 'cls_token'] == (base == 'maskfeat')
  assert got['backbone/mask_token'] == (base == 'beit')


@pytest.mark.parametrize('base', ['maskfeat', 'beit'])
def test_official_init_matches_the_backbones(base):
  # Reference (yyk-wew/SemanticMIM): MaskFeatViTOurs._init_weights — Linear/Conv weights
  # trunc_normal(0.02), Linear bias 0 (conv bias: PyTorch default); BEiTPretrainViTOurs —
  # TruncNormal(0.02) on Linear and Conv2d with bias 0, then proj / ffn.layers[1] of layers[i]
  # and extra_layers[i] divided by sqrt(2 (i + 1)).
  config = _tiny(smim_config, 'tiny' if base == 'maskfeat' else 'tiny,base=beit',
                 **{'model.width': 256, 'model.mlp_dim': 1024, 'model.depth': 3})
  assert config.init_scheme == base
  params, _ = jax.jit(semantic_mim.make(config).init)(jax.random.key(0), _batch(1))  # one program
  flat = {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name, x in flat.items():
    if name.endswith('kernel'):
      m = re.search(r'(blocks|extra_layers)_(\d+)/(attn/proj|mlp/fc2)/', name)
      scale = np.sqrt(2.0 * (int(m.group(2)) + 1)) if (m and base == 'beit') else 1.0
      assert abs(x.std() / (0.02 / scale) - 1) < 0.1, name
      assert abs(x.mean()) < 0.02 / scale * 0.1, name
    elif name.endswith('bias') and 'patch_embed' not in name:
      assert not x.any(), name
  conv_bias = flat['backbone/encoder/patch_embed/proj/bias']
  # PyTorch Conv2d default bias: U(±1/√(3·4·4)) for MaskFeat; BEiT's TruncNormal init zeroes it.
  assert (np.abs(conv_bias).max() > 0.05) == (base == 'maskfeat')
  assert np.abs(conv_bias).max() <= 1 / np.sqrt(48)
