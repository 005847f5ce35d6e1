"""Fine-tuning vs MAE `main_finetune.py` + `util/lr_decay.py`: every parameter's lr scale and
weight decay, and a trained `pos_embed` (sincos or learned, one or eight prefix tokens)."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from timm.models.vision_transformer import VisionTransformer

from configs import common
from configs.eval import finetune as finetune_config
from mimjax import checkpoint
from mimjax import optim
from mimjax.objectives import finetune
from mimjax.tree import path_name


# ------------------------------------------- reference: facebookresearch/mae util/lr_decay.py
def mae_layer_id(name: str, num_layers: int) -> int:
  """`get_layer_id_for_vit`."""
  if name in ['cls_token', 'pos_embed']:
    return 0
  elif name.startswith('patch_embed'):
    return 0
  elif name.startswith('blocks'):
    return int(name.split('.')[1]) + 1
  return num_layers


def mae_param_groups_lrd(named_shapes, weight_decay, no_weight_decay_list, layer_decay):
  """{name: (lr_scale, weight_decay)} as `param_groups_lrd` assigns them (depth from names)."""
  depth = len({n.split('.')[1] for n, _ in named_shapes if n.startswith('blocks.')})
  num_layers = depth + 1
  layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
  out = {}
  for n, shape in named_shapes:
    this_decay = 0.0 if (len(shape) == 1 or n in no_weight_decay_list) else weight_decay
    out[n] = (layer_scales[mae_layer_id(n, num_layers)], this_decay)
  return out


def torch_name(path: str) -> str:
  """mimjax fine-tune param path → the MAE/timm name (reg_token: the official SemanticMIM
  keeps all its proxies in one `cls_token` tensor)."""
  name = re.sub(r'^(encoder|head)/', '', path)
  name = re.sub(r'blocks_(\d+)', r'blocks.\1', name).replace('/', '.')
  name = re.sub(r'\.(kernel|scale)$', '.weight', name)
  return 'cls_token' if name == 'reg_token' else name


def _objective(tmp_path, pos_embed: str, prefix: int):
  model = common.vit_config('mu/4', 32)
  model.pos_embed = pos_embed
  model.num_prefix_tokens = prefix
  checkpoint.write_config(str(tmp_path), ml_collections.ConfigDict({'model': model}))
  config = finetune_config.get_config('tiny')
  config.pretrained = str(tmp_path)
  obj = finetune.make(config)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, (8,)).astype(np.int32)}
  params, state = jax.jit(obj.init)(jax.random.key(0), batch)  # eager: a compile per op
  return config, obj, params, state, batch


def _first_update(config, params):
  """grads → the real optimizer's first update at `params`, one compiled program for every
  call (eagerly, each tree op of each leaf compiles on its own)."""
  tx, _ = optim.make_optimizer(config.optim, params, total_steps=10, warmup_steps=0,
                               batch_size=config.batch_size)
  step = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])
  return lambda grads: step(grads, params)


def check_step_trains_pos_embed(config, obj, params, state, batch, prefix, first_update):
  """A real fine-tune loss gradient reaches every pos_embed row and AdamW moves them."""
  grads = jax.jit(jax.grad(lambda p: obj.loss(p, state, batch, jax.random.key(1), 0)[0]))(params)
  g = np.asarray(grads['encoder']['pos_embed'])
  assert np.all(np.abs(g[0, prefix:]).sum(-1) > 0)  # every patch row gets a gradient
  assert np.all(np.abs(g[0, :prefix]).sum(-1) > 0)  # and every prefix row
  updates = first_update(grads)
  # Adam's first step: Δ = −lr · layer-0 scale · g/(|g| + eps), no decay term.
  want = -config.optim.lr * config.optim.layer_decay ** 3 * g / (np.abs(g) + config.optim.eps)
  np.testing.assert_allclose(updates['encoder']['pos_embed'], want, rtol=1e-4, atol=1e-10)
  assert np.abs(np.asarray(updates['encoder']['pos_embed'])).max() > 1e-4


@pytest.mark.parametrize('pos_embed,prefix', [('sincos', 1), ('learned', 8)])
def test_finetune_param_groups_match_mae_and_pos_embed_trains(tmp_path, pos_embed, prefix):
  config, obj, params, state, batch = _objective(tmp_path, pos_embed, prefix)
  flat = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  # MAE's global-pool model deletes `norm`; ours keeps it unused (1-D: no decay, zero grad).
  flat = {k: v for k, v in flat.items() if not k.startswith('encoder/norm/')}
  names = {torch_name(k) for k in flat}
  timm_model = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                                 num_classes=10, global_pool='avg')
  assert names == {n for n, _ in timm_model.named_parameters()}  # the mapping covers all

  ld, wd, lr = config.optim.layer_decay, config.optim.weight_decay, config.optim.lr
  shapes = [(torch_name(k), v.shape) for k, v in flat.items()]
  # prefix 8: the official cls_token is (1, 8, D); every row gets cls_token's group.
  ref = mae_param_groups_lrd(shapes, wd, {'pos_embed', 'cls_token', 'dist_token'}, ld)

  # One AdamW step through the real optimizer with g = 1 everywhere: Adam's normalised
  # update is 1/(1 + eps), so Δp = −lr·scale·(1 + wd·p) exactly where p decays.
  first_update = _first_update(config, params)
  updates = first_update(jax.tree.map(jnp.ones_like, params))
  flat_updates = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(updates)[0]}
  for key, p in flat.items():
    scale, decay = ref[torch_name(key)]
    want = -lr * scale * (1 / (1 + config.optim.eps) + decay * np.asarray(p))
    np.testing.assert_allclose(flat_updates[key], want, rtol=1e-5, atol=1e-9, err_msg=key)
  check_step_trains_pos_embed(config, obj, params, state, batch, prefix, first_update)


def test_pretraining_keeps_the_sincos_table_fixed():
  from configs import mae as mae_config
  from mimjax.models.vit import ViT
  config = mae_config.get_config('tiny')
  assert config.optim.frozen == ('pos_embed$',)
  model = ViT(config.model)
  images = jnp.ones((1, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  g = jax.jit(jax.grad(lambda p: model.apply({'params': p}, images)[0].sum()))(params)
  assert not np.any(np.asarray(g['pos_embed']))  # stop-gradient, as requires_grad=False
  assert np.any(np.asarray(g['cls_token']))
