"""Linear probing of a frozen pretrained encoder (MAE protocol), with the beyond-cls AbMILP
and the CAE attentive-probe poolings.

The encoder comes from `config.pretrained` (its config.json model + params at the pretraining
objective's encoder path, loaded by the trainer through `config.init_from`); it is frozen twice
over: stop_gradient on its params and tokens, and `config.optim.frozen` (checked here) so the
optimizer never touches it. Trained: the head (pooling → BN(affine=False) or LayerNorm →
Linear); the BN running statistics live in the objective state. `config.probe`: pool ('cls' |
'mean' | 'abmilp' | 'attentive'), layer (-1 = last; e.g. 7 for SemanticMIM), num_classes,
num_heads, norm ('bn' | 'ln'), init_std, final_norm (False: layer -1 reads the raw last block,
as SemanticMIM's `final_norm=False`). pool / layer None → the pretraining config's
`probe_pool` / `probe_layer` (SemanticMIM configs set them), else 'cls' / -1.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mimjax.data.normalize import normalize_images
from mimjax.models import probe_heads
from mimjax.models import readout
from mimjax.models.vit import ViT
from mimjax.objectives import accuracy
from mimjax.objectives import pretrained
from mimjax.objectives.base import Objective
from mimjax.tree import matches, path_name


def check_frozen(model: ViT, path: tuple[str, ...], frozen_patterns, image_size: int) -> None:
  """Every encoder param must match `config.optim.frozen` (clear error otherwise)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, image_size, image_size, 3))))['params']
  names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      pretrained.nest(path, shapes))[0]]
  loose = [n for n in names if not matches(n, frozen_patterns)]
  if loose:
    raise ValueError(f'config.optim.frozen={tuple(frozen_patterns)} leaves encoder params '
                     f'trainable (e.g. {loose[0]!r}); expected a pattern such as '
                     f"'^{'/'.join(path)}/' that freezes the whole encoder")


def resolve_probe(probe: ml_collections.ConfigDict,
                  pre_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.probe` with pool / layer None filled from the pretraining config's `probe_pool` /
  `probe_layer` (else 'cls' / -1), validated."""
  out = ml_collections.ConfigDict(probe.to_dict())
  if out.get('pool') is None:
    out.pool = pre_config.get('probe_pool') or 'cls'
  if out.get('layer') is None:
    out.layer = int(pre_config.get('probe_layer') or -1)
  if out.pool not in readout.POOLS:
    raise ValueError(f'config.probe.pool={out.pool!r}: expected one of {readout.POOLS}')
  if out.get('norm', 'bn') not in probe_heads.NORMS:
    raise ValueError(f'config.probe.norm={out.norm!r}: expected one of {probe_heads.NORMS}')
  return out


def make(config: ml_collections.ConfigDict) -> Objective:
  """Probe objective from `config.pretrained`, `config.probe`, `config.model` overrides."""
  pre_config, path = pretrained.load_pretrained_config(config.pretrained)
  model_config = pretrained.merge_model_config(pre_config.model, config.get('model'))
  encoder = ViT(model_config)
  probe = resolve_probe(config.probe, pre_config)
  head = probe_heads.ProbeHead(probe, pretrained.num_prefix_tokens(model_config))
  check_frozen(encoder, path, tuple(config.optim.frozen), config.data.image_size)
  # MAE global pool and beyond-cls AbMILP read the last block's tokens without the final norm.
  normed = readout.reads_final_norm(probe.pool) and probe.get('final_norm', True)

  def tokens(params, images):
    enc = jax.lax.stop_gradient(pretrained.subtree(params, path))
    t, _ = readout.select_tokens(encoder, enc, normalize_images(images),
                                  int(probe.get('layer', -1)), normed)
    return jax.lax.stop_gradient(t)

  def init(rng, batch):
    enc_rng, head_rng = jax.random.split(rng)
    images = normalize_images(batch['image'][:1])
    enc = encoder.init(enc_rng, images)['params']
    t, _ = readout.select_tokens(encoder, enc, images, int(probe.get('layer', -1)), normed)
    variables = head.init(head_rng, t, train=False)
    params = {**pretrained.nest(path, enc), 'head': variables['params']}
    return params, {'batch_stats': variables.get('batch_stats', {})}  # {} without BN

  def loss(params, state, batch, rng, step):
    del rng, step
    (logits, _), new = head.apply(
        {'params': params['head'], 'batch_stats': state['batch_stats']},
        tokens(params, batch['image']), train=True, mutable=['batch_stats'])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    top1 = jnp.mean(jnp.argmax(logits, -1) == batch['label']) * 100.0
    return ce, ({'batch_stats': new.get('batch_stats', {})}, {'ce': ce, 'train_top1': top1})

  def logits_fn(params, state, images):
    out, _ = head.apply({'params': params['head'], 'batch_stats': state['batch_stats']},
                        tokens(params, images), train=False)
    return out

  return Objective(init=init, loss=loss, evaluate=accuracy.test_accuracy_fn(config, logits_fn),
                   encoder=path, predict=logits_fn)
