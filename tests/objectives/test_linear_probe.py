"""Linear probe `pool=mean` vs MAE `models_vit.forward_features` with `--global_pool`
(raw last-block patch tokens → mean → untrained fc_norm), through the probe objective's loss."""

import jax
import ml_collections
import numpy as np
import torch

from configs import common
from configs.eval import linear as linear_config
from mimjax import checkpoint
from mimjax.convert import to_torch
from mimjax.data.normalize import normalize_images
from mimjax.objectives import linear_probe


def mae_global_pool_features(model, x):
  """facebookresearch/mae models_vit.VisionTransformer.forward_features, global_pool=True
  (`self.norm` deleted; fc_norm = a fresh LayerNorm(D, eps 1e-6), never trained in linprobe)."""
  B = x.shape[0]
  x = model.patch_embed(x)
  cls_tokens = model.cls_token.expand(B, -1, -1)
  x = torch.cat((cls_tokens, x), dim=1)
  x = x + model.pos_embed
  for blk in model.blocks:
    x = blk(x)
  x = x[:, 1:, :].mean(dim=1)
  fc_norm = torch.nn.LayerNorm(x.shape[-1], eps=1e-6)
  return fc_norm(x)


def test_probe_mean_pool_is_mae_global_pool(tmp_path):
  model_config = common.vit_config('mu/4', 32)
  checkpoint.write_config(str(tmp_path), ml_collections.ConfigDict({'model': model_config}))
  config = linear_config.get_config('tiny,pool=mean')
  config.pretrained = str(tmp_path)
  obj = linear_probe.make(config)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, (16,)).astype(np.int32)}
  params, state = jax.jit(obj.init)(jax.random.key(0), batch)  # eager: a compile per op
  # A non-trivial final norm, so reading the final-normed tokens would change the features.
  params['encoder']['norm'] = {'scale': rng.uniform(0.5, 2.0, 64).astype(np.float32),
                               'bias': rng.normal(0, 0.5, 64).astype(np.float32)}
  params['head']['linear']['kernel'] = rng.normal(0, 1, (64, 10)).astype(np.float32)
  ce, _ = jax.jit(obj.loss, static_argnums=4)(params, state, batch, jax.random.key(1), 0)

  timm_model = to_torch.build_timm_model(model_config,
                                         to_torch.vit_to_timm(params['encoder'], model_config))
  images = np.asarray(normalize_images(batch['image'])).transpose(0, 3, 1, 2).copy()
  with torch.no_grad():
    feats = mae_global_pool_features(timm_model, torch.from_numpy(images)).numpy()
  np.testing.assert_allclose(float(ce), probe_ce(feats, params['head']['linear'],
                                                  batch['label']), rtol=1e-4)
  # The previous readout, LayerNorm(mean of the final-normed patch tokens), differs.
  with torch.no_grad():
    old = timm_model.forward_features(torch.from_numpy(images))[:, 1:].mean(1)
    old = torch.nn.functional.layer_norm(old, old.shape[-1:], eps=1e-6).numpy()
  assert abs(probe_ce(old, params['head']['linear'], batch['label']) - float(ce)) > 1e-3


def probe_ce(feats, head, labels):
  """main_linprobe head: BatchNorm1d(affine=False, eps 1e-6) in train mode → Linear → CE."""
  z = (feats - feats.mean(0)) / np.sqrt(feats.var(0) + 1e-6)
  logits = z @ np.asarray(head['kernel']) + np.asarray(head['bias'])
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  return float(-logp[np.arange(len(labels)), labels].mean())


def test_semanticmim_recipe_reads_probe_keys_and_uses_a_layernorm_readout(tmp_path):
  # A SemanticMIM-like pretrained encoder: 8 proxies, probe_layer / probe_pool in its config.
  model_config = common.vit_config('mu/4', 32)
  model_config.pos_embed = 'learned'
  model_config.num_prefix_tokens = 8
  checkpoint.write_config(str(tmp_path), ml_collections.ConfigDict(
      {'model': model_config, 'probe_layer': 1, 'probe_pool': 'cls'}))
  full = linear_config.get_config('vit_b,in1k,recipe=semanticmim')
  assert (full.batch_size, full.total_epochs, full.warmup_epochs, full.optim.name,
          full.optim.weight_decay, full.optim.b2) == (1024, 100, 0, 'adamw', 1e-4, 0.999)
  from mimjax import optim
  assert optim.peak_lr(full.optim, full.batch_size) == 4e-3
  config = linear_config.get_config('tiny,recipe=semanticmim')
  config.pretrained = str(tmp_path)
  obj = linear_probe.make(config)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, (16,)).astype(np.int32)}
  params, state = jax.jit(obj.init)(jax.random.key(0), batch)  # eager: a compile per op
  assert state['batch_stats'] == {} and set(params['head']) == {'linear'}  # no BatchNorm
  params['head']['linear']['kernel'] = rng.normal(0, 1, (64, 10)).astype(np.float32)
  ce, _ = jax.jit(obj.loss, static_argnums=4)(params, state, batch, jax.random.key(1), 0)

  # Official VisionTransformerOurs._format_output('cls_token') at out_indices=probe_layer:
  # ln2(mean of the proxy tokens of the raw block output), ln2 frozen at weight 1 / bias 0.
  from mimjax.models.vit import ViT
  _, aux = jax.jit(lambda p, x: ViT(model_config).apply({'params': p}, x, return_layers=True))(
      params['encoder'], normalize_images(batch['image']))
  x = np.asarray(aux['layers'][0])[:, :8].mean(1)
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  head = params['head']['linear']
  logits = x @ np.asarray(head['kernel']) + np.asarray(head['bias'])
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  want = -logp[np.arange(16), batch['label']].mean()
  np.testing.assert_allclose(float(ce), want, rtol=1e-4)
