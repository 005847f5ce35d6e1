"""Every training config's `tiny` row splits its train step over the devices.

The trainer's own jitted step (mimjax.train.trainer.build_step, with its shardings) is compiled
ahead of time from abstract inputs on 8 simulated devices: per-device FLOPs must be 1/8 (within
15 %) of the whole step's (XLA's cost analysis of the program before partitioning, which
agrees with a 1-device compile to ~1 %: checked once below, so each config compiles once) and
no batch-shaped array may be all-gathered. The MRE-MAE step with the Pallas kernel too.
Configs are discovered from configs/*.py, so a new objective is covered without editing this.

The same checks run with the TPU compiler (XLA:TPU from libtpu, for the compile-only chips of
a v5e 2x2 slice; the reference is a 1-chip compile, as a TPU lowering has no cost analysis):
a plain and a Pallas tiny row by default, every other tiny row and every paper row under
`-m slow`. The Pallas row must compile to Mosaic kernels (`tpu_custom_call`).
"""

import importlib
import pathlib
from typing import Optional

import jax
import ml_collections
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mimjax import checkpoint
from mimjax import plan
from mimjax import sharding
from mimjax.data import pipeline
from mimjax.objectives import base as objectives
from mimjax.objectives import pretrained
from tests import hlo

GLOBAL_BATCH = 40  # 5 per device on 8: no model dimension of a tiny row is a multiple of 40
CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'


def training_configs() -> list:
  """configs/<name>.py whose `tiny` row trains an objective (the SAM stage does not)."""
  names = []
  for path in sorted(CONFIG_DIR.glob('*.py')):
    module = importlib.import_module(f'configs.{path.stem}')
    if hasattr(module, 'get_config') and 'objective' in module.get_config('tiny'):
      names.append(path.stem)
  return names


def with_teacher(config: ml_collections.ConfigDict, row: str,
                 tmp_path_factory) -> ml_collections.ConfigDict:
  """A KD config (`config.teacher`) pointed at a freshly initialised MRE teacher of the same
  method and row (its params saved as a workdir); other configs as they are."""
  if 'teacher' not in config:
    return config
  teacher_cfg = importlib.import_module(f'configs.mre_{config.distill.method}').get_config(row)
  workdir = tmp_path_factory.mktemp('teacher')
  example = pipeline.blank_example(teacher_cfg.data, segments=True)
  obj = objectives.load(teacher_cfg.objective).make(teacher_cfg)
  params = jax.jit(obj.init)(jax.random.key(0), example)[0]  # one program, not one per op
  checkpoint.save_params(str(workdir), teacher_cfg, params)
  config.teacher = str(workdir)
  return config


def tiny(name: str, tmp_path_factory,
         attention: Optional[str] = None) -> ml_collections.ConfigDict:
  config = importlib.import_module(f'configs.{name}').get_config('tiny')
  config.batch_size = GLOBAL_BATCH
  if attention:
    config.model.attention = attention
  return with_teacher(config, 'tiny', tmp_path_factory)


def test_discovery_finds_every_objective_family():
  assert {'mae', 'mre_mae', 'lut', 'dino', 'mre_dino', 'distill', 'semantic_mim', 'beit',
          'maskfeat'} <= set(training_configs())


@pytest.mark.parametrize('name', training_configs())
def test_train_step_divides_over_8_devices(name, tmp_path_factory):
  config = tiny(name, tmp_path_factory)
  assert plan.scaling_problems(plan.compile_step(config, plan.mesh_of(8)), 8, GLOBAL_BATCH) == []


def test_pallas_step_divides_over_8_devices(tmp_path_factory):
  # The kernel in interpret mode under shard_map: each device runs it on its own rows.
  config = tiny('mre_mae', tmp_path_factory, attention='pallas')
  assert plan.scaling_problems(plan.compile_step(config, plan.mesh_of(8)), 8, GLOBAL_BATCH) == []


# mre_dino's compile costs ~2× mre_mae's (45 s loaded): slow; the multi-crop cut's sharding is
# also checked alone (tests/data/test_device_augment.py, 8 devices).
@pytest.mark.parametrize('name', ['mre_mae', pytest.param('mre_dino', marks=pytest.mark.slow)])
def test_device_crops_divide_over_8_devices(name, tmp_path_factory):
  """crop_on='device' (the paper rows' default): the step also cuts every view, its segment map
  and patch ids from the canvases; each device still cuts only its own rows."""
  config = tiny(name, tmp_path_factory)
  config.data.update(crop_on='device', canvas_size=(36, 44))  # no side a multiple of 40
  assert plan.scaling_problems(plan.compile_step(config, plan.mesh_of(8)), 8, GLOBAL_BATCH) == []


def test_whole_step_flops_equal_a_one_device_compile(tmp_path_factory):
  """The reference of the check above: the unpartitioned program's FLOPs (no extra compile)
  are what one device does with the whole batch."""
  one = plan.compile_step(tiny('mae', tmp_path_factory), plan.mesh_of(1))
  assert one.global_flops == pytest.approx(plan.flops(one.compiled), rel=0.03)


def _forgets_sharding(objective, mesh):
  """The objective, but its loss first gathers the whole batch onto every device."""
  replicate = lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))
  loss = lambda p, s, b, r, step: objective.loss(p, s, jax.tree.map(replicate, b), r, step)
  return objectives.Objective(init=objective.init, loss=loss)


def test_checker_fails_on_a_step_that_gathers_its_batch(tmp_path_factory):
  config = tiny('mae', tmp_path_factory)
  objective = objectives.load(config.objective).make(config)
  mesh = plan.mesh_of(8)
  step = plan.compile_step(config, mesh, _forgets_sharding(objective, mesh))
  problems = plan.scaling_problems(step, 8, GLOBAL_BATCH)
  assert len(problems) == 2, problems
  assert 'FLOPs' in problems[0] and 'all-gather' in problems[1]


# ------------------------------------------------------------------------ the TPU compiler
TPU_CHIPS = 4
# Paper rows compile at 9 images per chip (global 36): no dimension of a paper model (widths
# 384..1280, 196/784 patches, 65536 DINO outputs, 36 is not among them) is a multiple of 36.
PAPER_GLOBAL_BATCH = 36
PAPER_ROWS = [('mae', 'vit_b,in1k,1600ep'), ('mae', 'vit_l,in1k,800ep'),
              ('mae', 'vit_h,in1k,1600ep'), ('mre_mae', 'vit_b,in100,1600ep'),
              ('mre_mae', 'vit_b8,in100,1600ep'),
              ('dino', 'vit_s,in100,300ep'), ('mre_dino', 'vit_s,in100,300ep'),
              ('lut', 'vit_b,in1k,1600ep'), ('semantic_mim', 'vit_b,in1k,300ep'),
              ('distill', 'vit_b,in100,100ep')]
# The MRE teacher row each KD paper row distils (configs/distill.py's docstring).
TEACHER_ROWS = {'vit_b,in100,100ep': 'vit_b,in100,1600ep'}


def tpu_scaling(config: ml_collections.ConfigDict) -> tuple:
  """(the step compiled for 4 TPU chips, its scaling problems against a 1-chip compile)."""
  four = plan.compile_step(config, hlo.tpu_mesh(TPU_CHIPS))
  one = plan.compile_step(config, hlo.tpu_mesh(1))
  return four, plan.scaling_problems(four, TPU_CHIPS, config.batch_size,
                                     whole_flops=plan.flops(one.compiled))


def _tiny_tpu_rows() -> list:
  default = [('mae', None), ('mre_mae', 'pallas')]
  slow = [(name, None) for name in training_configs() if name not in ('mae',)]
  slow.append(('mre_dino', 'pallas'))
  return default + [pytest.param(*row, marks=pytest.mark.slow) for row in slow]


@hlo.needs_libtpu
@pytest.mark.parametrize('name,attention', _tiny_tpu_rows())
def test_tiny_step_divides_over_4_tpu_chips(name, attention, tmp_path_factory):
  config = tiny(name, tmp_path_factory, attention)
  step, problems = tpu_scaling(config)
  assert problems == []
  mosaic = step.compiled.as_text().count('tpu_custom_call')
  assert (mosaic > 0) == (attention == 'pallas')  # the kernel, not its interpret mode


@pytest.mark.slow   # minutes to tens of minutes per row on a small CPU
@hlo.needs_libtpu
@pytest.mark.parametrize('name,row', PAPER_ROWS)
def test_paper_step_divides_over_4_tpu_chips(name, row, tmp_path_factory):
  config = importlib.import_module(f'configs.{name}').get_config(row)
  config = with_teacher(config, TEACHER_ROWS.get(row, row), tmp_path_factory)
  assert tpu_scaling(plan.plan_config(config, PAPER_GLOBAL_BATCH))[1] == []


@hlo.needs_libtpu
def test_pallas_feature_extractor_compiles_for_4_tpu_chips(tmp_path_factory):
  """Evaluators trace under their mesh as the train step does: the frozen encoder's Pallas
  attention runs as Mosaic kernels on each chip's rows (unpartitionable otherwise)."""
  config = tiny('mae', tmp_path_factory, attention='pallas')
  mesh = hlo.tpu_mesh(TPU_CHIPS)
  extractor = pretrained.Extractor(config.model, config.data, mesh, batch_size=8)
  size = config.model.image_size
  images = hlo.abstract((8, size, size, 3), jax.numpy.uint8, mesh, P(sharding.BATCH_AXES))
  params = jax.eval_shape(extractor.model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct(images.shape, jax.numpy.float32))['params']
  params = jax.tree.map(lambda a: hlo.abstract(a.shape, a.dtype, mesh), params)
  compiled = extractor._fn.trace(params, images).lower().compile()
  assert compiled.as_text().count('tpu_custom_call') > 0
