"""Every training config's `tiny` row splits its train step over the devices.

The trainer's own jitted step (mimjax.train.trainer.build_step, with its shardings) is compiled
ahead of time from abstract inputs on 8 simulated devices: per-device FLOPs must be 1/8 (within
15 %) of the whole step's (XLA's cost analysis of the program before partitioning, which
agrees with a 1-device compile to ~1 %: checked once below, so each config compiles once) and
no batch-shaped array may be all-gathered.
Configs are discovered from configs/*.py, so a new objective is covered without editing this.
"""

import importlib
import pathlib

import jax
import ml_collections
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mimjax import checkpoint
from mimjax import plan
from mimjax.data import pipeline
from mimjax.objectives import base as objectives

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


def tiny(name: str, tmp_path_factory) -> ml_collections.ConfigDict:
  config = importlib.import_module(f'configs.{name}').get_config('tiny')
  config.batch_size = GLOBAL_BATCH
  if 'teacher' in config:  # KD: a freshly initialised MRE teacher of the same method
    teacher_cfg = importlib.import_module(f'configs.mre_{config.distill.method}').get_config('tiny')
    workdir = tmp_path_factory.mktemp(f'{name}_teacher')
    example = pipeline.blank_example(teacher_cfg.data, segments=True)
    obj = objectives.load(teacher_cfg.objective).make(teacher_cfg)
    params = jax.jit(obj.init)(jax.random.key(0), example)[0]  # one program, not one per op
    checkpoint.save_params(str(workdir), teacher_cfg, params)
    config.teacher = str(workdir)
  return config


def test_discovery_finds_every_objective_family():
  assert {'mae', 'mre_mae', 'lut', 'dino', 'mre_dino', 'distill', 'semantic_mim', 'beit',
          'maskfeat'} <= set(training_configs())


@pytest.mark.parametrize('name', training_configs())
def test_train_step_divides_over_8_devices(name, tmp_path_factory):
  config = tiny(name, tmp_path_factory)
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
