"""The one pretrained-workdir loader: a DINO workdir gives its EMA teacher by default (as DINO's
eval_knn.py / eval_linear.py, `--checkpoint_key teacher`), the student when asked, in the
evaluations, the probe's `init_from` and the KD teacher; other objectives are unchanged."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import dino as dino_config
from configs import distill as distill_config
from configs import mae as mae_config
from configs.eval import analysis as analysis_config
from configs.eval import linear as linear_config
from mimjax import checkpoint
from mimjax import main
from mimjax.objectives import dino, distill, linear_probe, mae
from mimjax.objectives import pretrained
from mimjax.train import trainer


def _dino_batch(b=2):
  rng = np.random.default_rng(0)
  return {'global': rng.integers(0, 256, (b, 2, 32, 32, 3), np.uint8),
          'local': rng.integers(0, 256, (b, 2, 16, 16, 3), np.uint8)}


def _random_like(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(x.dtype), tree)


def _save_train_state(workdir, config, params, state, step=3):
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ts = {'params': params, 'opt_state': {'count': np.zeros((), np.int32)}, 'state': state,
        'step': np.asarray(step, np.int32)}
  ckpt.save(step, ts, {}, config, force=True)
  ckpt.close()
  checkpoint.write_config(workdir, config)


@pytest.fixture(scope='module')
def dino_workdir(tmp_path_factory):
  """A DINO train checkpoint whose EMA teacher differs from the student everywhere."""
  config = dino_config.get_config('tiny')
  dino_config.tiny_recipe(config, bn_head=False)  # a head the KD objective can read
  shapes, state_shapes = jax.eval_shape(dino.make(config).init, jax.random.key(0), _dino_batch())
  student, teacher = _random_like(shapes, 1), _random_like(shapes, 2)
  workdir = str(tmp_path_factory.mktemp('dino'))
  state = {'teacher': teacher, 'center': np.zeros(state_shapes['center'].shape, np.float32)}
  _save_train_state(workdir, config, student, state)
  return workdir, student, teacher


def _equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_loader_defaults_to_the_ema_teacher(dino_workdir):
  workdir, student, teacher = dino_workdir
  default = pretrained.load_pretrained(workdir)
  assert default.weights == 'teacher' and default.path == ('encoder',)
  assert _equal(default.params, teacher) and not _equal(default.params, student)
  assert _equal(default.encoder, teacher['encoder'])
  chosen = pretrained.load_pretrained(workdir, 'student')
  assert chosen.weights == 'student' and _equal(chosen.params, student)
  with pytest.raises(ValueError, match="checkpoint_key='ema': expected one of"):
    pretrained.load_pretrained(workdir, 'ema')


def test_objectives_without_teacher_are_unchanged(tmp_path):
  config = mae_config.get_config('tiny')
  batch = {'image': np.zeros((2, 32, 32, 3), np.uint8)}
  shapes, _ = jax.eval_shape(mae.make(config).init, jax.random.key(0), batch)
  params = _random_like(shapes, 3)
  _save_train_state(str(tmp_path), config, params, {})
  for key in ('teacher', 'student'):
    loaded = pretrained.load_pretrained(str(tmp_path), key)
    assert loaded.weights == 'trained' and _equal(loaded.params, params)


def _gardener(workdir, out, **kw):
  config = analysis_config.get_config('tiny')
  config.evals = ml_collections.ConfigDict(
      {'gardener': {'module': 'block_entropy', 'bins': 64, 'num_images': 8}})
  config.batch_size = 8
  config.pretrained = workdir
  config.update_from_flattened_dict(kw)
  main.run(config, out)
  with open(os.path.join(out, 'results.json')) as f:
    return {k: v for k, v in json.load(f).items() if k != 'step'}


def test_evaluation_uses_teacher_by_default_and_student_when_asked(dino_workdir, tmp_path):
  workdir, student, teacher = dino_workdir
  # The teacher's encoder as an imported model (no objective, one set of weights) is the
  # reference.
  imported = str(tmp_path / 'imported_teacher')
  checkpoint.save_params(imported, ml_collections.ConfigDict(
      {'model': dino_config.get_config('tiny').model.to_dict()}), {'encoder': teacher['encoder']})
  ref = _gardener(imported, str(tmp_path / 'ref'))
  assert _gardener(workdir, str(tmp_path / 'default')) == ref
  assert _gardener(workdir, str(tmp_path / 'student'), checkpoint_key='student') != ref


def test_probe_init_from_takes_the_teacher(dino_workdir):
  workdir, student, teacher = dino_workdir
  config = linear_config.get_config('tiny')
  config.pretrained = workdir
  objective = linear_probe.make(config)
  shapes, _ = jax.eval_shape(objective.init, jax.random.key(0),
                             {'image': np.zeros((1, 32, 32, 3), np.uint8)})
  for key, want in (('teacher', teacher), ('student', student)):
    ts = {'params': jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype)), shapes)}
    config.checkpoint_key = key
    ts = trainer._init_from(ts, trainer._load_init_from(config), config.init_from, objective)
    assert _equal(jax.device_get(ts['params']['encoder']), want['encoder'])


def test_kd_teacher_is_the_ema_teacher(dino_workdir):
  workdir, _, teacher = dino_workdir
  config = distill_config.get_config('tiny,method=dino')
  config.teacher = workdir
  assert config.distill.checkpoint_key == 'teacher'
  params, state = jax.jit(distill.make(config).init)(jax.random.key(0), _dino_batch())
  assert _equal(jax.device_get(state['teacher']), teacher)
  assert _equal(jax.device_get(params['encoder']), teacher['encoder'])  # distill.init='teacher'


def test_online_monitors_read_the_ema_teacher_unless_student_is_asked():
  """A monitor during DINO pretraining sees the objective's EMA teacher (DINO's eval_knn.py),
  or the trained student with checkpoint_key=student."""
  from mimjax.evaluate import block_entropy
  from mimjax import sharding
  config = dino_config.get_config('tiny')
  objective = dino.make(config)
  shapes, state_shapes = jax.eval_shape(objective.init, jax.random.key(0), _dino_batch())
  student, teacher = _random_like(shapes, 1), _random_like(shapes, 2)
  state = {'teacher': teacher, 'center': np.zeros(state_shapes['center'].shape, np.float32)}
  mesh = sharding.make_mesh(config.mesh)
  knn, = trainer.make_evaluators(config, objective, mesh)  # the config's kNN monitor
  assert knn.splits == ('train', 'test')
  assert _equal(knn.encoder_params(student, state), teacher['encoder'])
  # Weight entropy alone (no images): its value says which encoder the evaluator read.
  cfg = ml_collections.ConfigDict({'module': 'block_entropy', 'bins': 64, 'num_images': 0})
  got = block_entropy.make('g', cfg, config, objective, mesh).run(student, state)
  want = block_entropy.block_weight_entropy(teacher['encoder'], 64)
  np.testing.assert_allclose([got[f'entropy/layer_{i + 1}'] for i in range(len(want))], want)
  cfg.checkpoint_key = 'student'
  monitor = block_entropy.make('g', cfg, config, objective, mesh)
  assert _equal(monitor.encoder_params(student, state), student['encoder'])
  assert monitor.run(student, state) != got
  cfg.checkpoint_key = 'ema'
  with pytest.raises(ValueError, match="checkpoint_key='ema': expected one of"):
    block_entropy.make('g', cfg, config, objective, mesh)
