"""LARS (MAE util/lars.py, re-written in PyTorch here) and MAE layer-wise lr decay."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from mimjax import optim


class TorchLARS(torch.optim.Optimizer):
  """facebookresearch/mae util/lars.py, verbatim logic."""

  def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
    super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                  trust_coefficient=trust_coefficient))

  @torch.no_grad()
  def step(self):
    for g in self.param_groups:
      for p in g['params']:
        dp = p.grad
        if dp is None:
          continue
        if p.ndim > 1:
          dp = dp.add(p, alpha=g['weight_decay'])
          param_norm = torch.norm(p)
          update_norm = torch.norm(dp)
          one = torch.ones_like(param_norm)
          q = torch.where(param_norm > 0.,
                          torch.where(update_norm > 0,
                                      (g['trust_coefficient'] * param_norm / update_norm), one),
                          one)
          dp = dp.mul(q)
        state = self.state[p]
        if 'mu' not in state:
          state['mu'] = torch.zeros_like(p)
        mu = state['mu']
        mu.mul_(g['momentum']).add_(dp)
        p.add_(mu, alpha=-g['lr'])


def test_lars_matches_mae_util_lars():
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5, 3)).astype(np.float32)
  b0 = rng.normal(size=(3,)).astype(np.float32)
  z0 = np.zeros((2, 2), np.float32)  # zero-norm param: trust ratio falls back to 1
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in
            {'w': w0, 'b': b0, 'z': z0}.items()} for _ in range(3)]
  lr, wd = 0.5, 0.05

  tw = {k: torch.tensor(v.copy(), requires_grad=True)
        for k, v in {'w': w0, 'b': b0, 'z': z0}.items()}
  opt = TorchLARS(list(tw.values()), lr=lr, weight_decay=wd)
  for g in grads:
    for k, p in tw.items():
      p.grad = torch.tensor(g[k])
    opt.step()

  params = {'w': jnp.asarray(w0), 'b': jnp.asarray(b0), 'z': jnp.asarray(z0)}
  tx = optim.lars(lr, weight_decay=wd)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, updates)
  for k in params:
    np.testing.assert_allclose(np.asarray(params[k]), tw[k].detach().numpy(), rtol=1e-5,
                               atol=1e-6)


def test_layer_ids_follow_mae_get_layer_id_for_vit():
  L = 3  # depth 2 → num_layers 3
  assert optim.layer_id('encoder/cls_token', L) == 0
  assert optim.layer_id('encoder/pos_embed', L) == 0
  assert optim.layer_id('encoder/patch_embed/proj/kernel', L) == 0
  assert optim.layer_id('encoder/blocks_0/attn/qkv/kernel', L) == 1
  assert optim.layer_id('encoder/blocks_1/mlp/fc2/bias', L) == 2
  assert optim.layer_id('encoder/norm/scale', L) == 3
  assert optim.layer_id('head/head/kernel', L) == 3


def test_layer_decay_lr_per_parameter_matches_mae_formula():
  params = {'encoder': {'cls_token': jnp.ones((1, 1, 4)),
                        'patch_embed': {'proj': {'kernel': jnp.ones((2, 2, 3, 4))}},
                        'blocks_0': {'w': jnp.ones((4, 4))}, 'blocks_1': {'w': jnp.ones((4, 4))},
                        'norm': {'scale': jnp.ones(4)}},
            'head': {'kernel': jnp.ones((4, 2))}}
  ld = 0.65
  scales = optim.layer_decay_scales(params, ld)
  # num_layers = depth + 1 = 3; scale = ld^(3 − layer_id)
  assert scales['encoder']['cls_token'] == pytest.approx(ld ** 3)
  assert scales['encoder']['patch_embed']['proj']['kernel'] == pytest.approx(ld ** 3)
  assert scales['encoder']['blocks_0']['w'] == pytest.approx(ld ** 2)
  assert scales['encoder']['blocks_1']['w'] == pytest.approx(ld ** 1)
  assert scales['encoder']['norm']['scale'] == 1.0 and scales['head']['kernel'] == 1.0

  # Through make_optimizer with plain SGD (no momentum): update = −lr·scale·grad.
  config = ml_collections.ConfigDict({'name': 'sgd', 'lr': 0.1, 'momentum': 0.0,
                                      'weight_decay': 0.0, 'frozen': (), 'no_decay': (),
                                      'layer_decay': ld})
  tx, _ = optim.make_optimizer(config, params, total_steps=10, warmup_steps=0, batch_size=1)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['encoder']['blocks_0']['w'], -0.1 * ld ** 2, rtol=1e-6)
  np.testing.assert_allclose(updates['encoder']['cls_token'], -0.1 * ld ** 3, rtol=1e-6)
  np.testing.assert_allclose(updates['head']['kernel'], -0.1, rtol=1e-6)


def test_bad_optimizer_name_and_layer_decay_are_named():
  params = {'w': jnp.ones((2, 2))}
  base = dict(lr=0.1, weight_decay=0.0, frozen=(), no_decay=(), momentum=0.9)
  with pytest.raises(ValueError, match='config.optim.name'):
    optim.make_optimizer(ml_collections.ConfigDict(dict(base, name='adam')), params,
                         total_steps=1, warmup_steps=0, batch_size=1)
  with pytest.raises(ValueError, match='config.optim.layer_decay'):
    optim.make_optimizer(ml_collections.ConfigDict(dict(base, name='sgd', layer_decay=1.5)),
                         params, total_steps=1, warmup_steps=0, batch_size=1)
