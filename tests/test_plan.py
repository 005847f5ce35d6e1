"""mimjax.plan: the HLO collective parser, a plan of a tiny config on 8 devices (and the
checked alternatives when it does not fit), and on a 4-chip TPU slice (XLA:TPU)."""

import importlib.util
import math

import jax
import numpy as np
import pytest

from configs import mae as mae_config
from mimjax import plan
from mimjax import tree
from mimjax.data import pipeline
from mimjax.objectives import base as objectives
from mimjax.train import trainer
from tests.hlo import needs_libtpu

HLO = """
  %all-gather-start.1 = (f32[5,64]{1,0}, f32[40,64]{1,0}) all-gather-start(f32[5,64]{1,0} %p), dimensions={0}
  %all-gather-done.1 = f32[40,64]{1,0} all-gather-done((f32[5,64]{1,0}, f32[40,64]{1,0}) %all-gather-start.1)
  %all-gather.2 = bf16[8,16]{1,0} all-gather(bf16[1,16]{1,0} %q), dimensions={0}
  %all-reduce.3 = (f32[]{:T(128)}, f32[64,256]{1,0}) all-reduce(f32[] %a, f32[64,256]{1,0} %b), to_apply=%add
  %reduce-scatter = f32[8,32]{1,0} reduce-scatter(f32[64,32]{1,0} %c), dimensions={0}
  %fusion = f32[40,64]{1,0} fusion(f32[40,64]{1,0} %d), kind=kLoop, calls=%all-gather-like
"""


def test_collectives_are_parsed_with_result_bytes():
  ops = plan.collectives(HLO)
  assert [op.kind for op in ops] == ['all-gather', 'all-gather', 'all-reduce', 'reduce-scatter']
  assert ops[0].shapes == ((5, 64), (40, 64)) and ops[0].bytes == 4 * (5 * 64 + 40 * 64)
  assert ops[1].bytes == 2 * 8 * 16
  assert ops[2].shapes == ((), (64, 256)) and ops[2].bytes == 4 + 4 * 64 * 256
  assert plan.collective_summary(ops) == {
      'all-gather': {'count': 2, 'bytes': 4 * 45 * 64 + 256},
      'all-reduce': {'count': 1, 'bytes': 4 + 4 * 64 * 256},
      'reduce-scatter': {'count': 1, 'bytes': 4 * 8 * 32}}
  # Only the all-gather whose result has the global batch (40) is batch-shaped.
  assert [op.shapes for op in plan.batch_all_gathers(HLO, 40)] == [((5, 64), (40, 64))]
  assert plan.batch_all_gathers(HLO, 24) == []


def test_devices_cannot_be_faked_after_jax_started():
  with pytest.raises(RuntimeError, match='before'):
    plan.fake_cpu_devices(8)


@pytest.fixture(scope='module')
def tiny_plan():
  return plan.plan(mae_config.get_config('tiny'), devices=8)


def test_plan_of_tiny_mae_on_8_devices(tiny_plan):
  p = tiny_plan
  config = mae_config.get_config('tiny')
  assert (p['devices'], p['global_batch'], p['per_device_batch']) == (8, 64, 8)
  # Unsharded (fsdp 1) float32 params; AdamW holds two moments of the trained ones.
  # The trainer's state as plan.compile_step builds it, without compiling the step again
  # (the fixture already did: a second compile was most of this test's time).
  example = pipeline.blank_example(config.data, segments=plan.needs_segments(config))
  built = trainer.build_step(config, objectives.load(config.objective).make(config),
                             plan.mesh_of(8), example,
                             pipeline.num_examples(config.data, 'train'))
  params = built.abstract['params']
  sizes = {tree.path_name(k): math.prod(x.shape)
           for k, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert p['params_bytes'] == 4 * sum(sizes.values())
  # AdamW: two float32 moments per trained param (the sincos pos-embeds are frozen), + counts.
  trained = sum(n for k, n in sizes.items() if not k.endswith('pos_embed'))
  assert 8 * trained <= p['opt_state_bytes'] <= 8 * trained + 64
  assert p['batch_bytes'] == 8 * (32 * 32 * 3 + 4)       # uint8 images + int32 labels
  assert p['flops'] > 0 and p['temp_bytes'] > 0 and p['peak_bytes'] >= p['argument_bytes']
  assert p['collectives']['all-reduce']['count'] >= 1    # gradient mean over the devices
  assert p['batch_all_gathers'] == 0
  assert all(p['fits'].values())
  table = plan.format_plan('configs/mae.py:tiny', p)
  assert '| GFLOP per step |' in table and 'H100 80GB: yes' in table


def test_per_device_batch_extrapolates_to_the_full_batch(tiny_plan):
  small = plan.plan(mae_config.get_config('tiny'), devices=8, per_device_batch=2)
  assert small['compiled_per_device_batch'] == [2, 4] and small['per_device_batch'] == 8
  assert small['params_bytes'] == tiny_plan['params_bytes']
  assert small['batch_bytes'] == tiny_plan['batch_bytes']    # exactly linear
  np.testing.assert_allclose(small['flops'], tiny_plan['flops'], rtol=0.05)


def test_a_scanned_step_reports_the_unrolled_steps_flops(tiny_plan):
  # XLA's cost analysis counts a scan's body once (tiny MAE: ~28 % short); the plan reports
  # the unrolled step's FLOPs (trainer.whole_step_flops), within the 3 % by which a lowering's
  # figure and a compiled program's agree (tests/test_scale.py).
  config = mae_config.get_config('tiny')
  config.model.scan_layers = True
  scanned = plan.plan(config, devices=8)
  np.testing.assert_allclose(scanned['flops'], tiny_plan['flops'], rtol=0.03)
  assert trainer.whole_step_flops(mae_config.get_config('tiny'), {}, 1) is None  # unrolled


def test_plan_needs_the_devices_and_a_divisible_batch():
  config = mae_config.get_config('tiny')
  with pytest.raises(ValueError, match='--devices=16'):
    plan.plan(config, devices=16)
  config.batch_size = 60
  with pytest.raises(ValueError, match='not divisible by the 8 devices'):
    plan.plan(config, devices=8)


def test_plan_that_does_not_fit_lists_checked_alternatives(monkeypatch):
  # Every named accelerator shrunk below the tiny step's peak: each alternative is compiled.
  monkeypatch.setattr(plan, 'ACCELERATORS', {'a 1 MB chip': 1e6})
  config = mae_config.get_config('tiny')
  config.batch_size = 16
  p = plan.plan(config, devices=8)
  assert p['fits'] == {'a 1 MB chip': False}
  flags = [a['flag'] for a in p['alternatives']]
  assert flags == ['--config.model.remat=True', '--config.mesh.fsdp=8',
                   '--config.grad_accum=2']       # 4 micro-batches of 16 do not split over 8
  accum = p['alternatives'][2]
  assert 0 < accum['peak_bytes'] < p['peak_bytes'] and not accum['fits']
  assert 'Does not fit' in plan.format_plan('configs/mae.py:tiny', p)


def test_target_errors_are_one_line(monkeypatch):
  with pytest.raises(ValueError, match=r'--target=gpu:h100: expected tpu:TOPOLOGY'):
    plan.plan(mae_config.get_config('tiny'), target='gpu:h100')
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'libtpu' else real(name, *a))
  with pytest.raises(ValueError, match=r'needs libtpu.*\.\[dev\]'):
    plan.plan(mae_config.get_config('tiny'), target='tpu:v5e:2x2')


@needs_libtpu
def test_plan_for_a_tpu_slice():
  config = mae_config.get_config('tiny')
  config.batch_size = 40      # the program tests/test_scale.py compiles for 4 chips
  p = plan.plan(config, target='tpu:v5e:2x2')
  assert (p['target'], p['device_kind'], p['devices']) == ('tpu:v5e:2x2', 'TPU v5 lite', 4)
  assert p['fits'] == {'TPU v5 lite 16.00 GB − 10% reserve = 14.40 GB': True}
  assert p['flops'] > 0 and p['temp_bytes'] > 0 and p['batch_all_gathers'] == 0
  assert 'tpu:v5e:2x2 (TPU v5 lite)' in plan.format_plan('configs/mae.py:tiny', p)
  with pytest.raises(ValueError, match='not a TPU topology libtpu knows'):
    plan.plan(config, target='tpu:v9z:2x2')
