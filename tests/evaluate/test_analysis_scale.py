"""The analysis evaluators run the encoder on batch-split images: 1/8 of the FLOPs per device."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from configs import mae
from mimjax import sharding
from mimjax.evaluate import attention_stats
from mimjax.evaluate import block_entropy
from mimjax.evaluate import spectrum
from mimjax.models.vit import ViT
from mimjax.objectives import pretrained
from tests import hlo


@pytest.mark.parametrize('module', [attention_stats, spectrum, block_entropy])
def test_analysis_evaluator_splits_its_batch_over_8_devices(module):
  config = mae.get_config('tiny')
  size = config.data.image_size
  params = jax.eval_shape(lambda: ViT(config.model).init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)))['params'])
  compiled = {}
  for devices in (1, 8):
    mesh = hlo.mesh_of(devices)
    evaluator = module.make('x', ml_collections.ConfigDict({}), config, pretrained.EncoderRef(),
                            mesh)
    abstract_params = jax.tree.map(lambda a: hlo.abstract(a.shape, a.dtype, mesh), params)
    images = hlo.abstract((64, size, size, 3), jnp.uint8, mesh, P(sharding.BATCH_AXES))
    compiled[devices] = evaluator._fn.lower(abstract_params, images).compile()
  assert hlo.flops(compiled[8]) == pytest.approx(hlo.flops(compiled[1]) / 8, rel=0.15)
  assert not hlo.all_gather_sizes(compiled[8])  # nothing image-shaped is gathered
