"""The training loop: loss falls, data-parallel equivalence, exact resume, NaN stop, errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import mae as mae_config
from mimjax import checkpoint
from mimjax.models import layout
from mimjax.objectives import mae
from mimjax.objectives.base import Objective
from mimjax.train import trainer
from tests.env import subprocess_env
from tests.trained import assert_trained_params_close

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**overrides):
  config = mae_config.get_config('tiny')
  config.batch_size = 16
  config.total_steps = 6
  config.warmup_steps = 2
  config.log_every = 1
  config.checkpoint_every = 3
  config.async_checkpoint = False
  config.data.worker_count = 0
  config.update_from_flattened_dict(overrides)  # keys may be dotted: 'mesh.devices'
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """(record, workdir) of one uninterrupted tiny_config() run, shared by the tests below."""
  workdir = tmp_path_factory.mktemp('ref')
  return trainer.train_and_evaluate(tiny_config(), str(workdir)), workdir


def test_metrics_config_and_checkpoints_written(reference_run):
  record, tmp_path = reference_run
  rows = read_metrics(tmp_path)
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert {'step', 'loss', 'lr', 'img_per_s', 'grad_norm'} <= set(rows[0])
  assert record['step'] == 6
  assert (tmp_path / 'config.json').exists() and (tmp_path / 'tensorboard').is_dir()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']
  assert rows[0]['lr'] == 0.0 and rows[1]['lr'] == pytest.approx(5e-4)  # warm-up 2 steps


def test_data_parallel_equivalence_1_vs_8_devices(reference_run, tmp_path):
  assert jax.device_count() == 8
  one = trainer.train_and_evaluate(tiny_config(**{'mesh.devices': 1, 'total_steps': 3}),
                                   str(tmp_path / 'one'))
  fsdp = trainer.train_and_evaluate(tiny_config(**{'total_steps': 3, 'mesh.fsdp': 4,
                                                   'fsdp_min_size': 1}), str(tmp_path / 'fsdp'))
  a = [r['loss'] for r in read_metrics(tmp_path / 'one')]
  # The 8-device run: the reference's first 3 losses (they follow the 2 warm-up updates only,
  # whose lr does not depend on total_steps).
  b = [r['loss'] for r in read_metrics(reference_run[1])][:3]
  c = [r['loss'] for r in read_metrics(tmp_path / 'fsdp')]
  np.testing.assert_allclose(a, b, rtol=1e-5)
  np.testing.assert_allclose(a, c, rtol=1e-5)
  assert one['step'] == fsdp['step'] == 3


def test_grad_accumulation_matches_full_batch(reference_run, tmp_path):
  trainer.train_and_evaluate(tiny_config(total_steps=2, grad_accum=2), str(tmp_path / 'acc'))
  # The reference's first 2 steps: the lr of warm-up steps does not depend on total_steps.
  full = read_metrics(reference_run[1])[:2]
  acc = read_metrics(tmp_path / 'acc')
  # Same data; different masking draws per micro-batch, so compare gradient scale loosely and
  # exactness on the lr/steps bookkeeping.
  assert [r['lr'] for r in full] == [r['lr'] for r in acc]
  assert abs(full[0]['loss'] - acc[0]['loss']) / full[0]['loss'] < 0.2


def test_resume_in_process_and_on_other_device_count(reference_run, tmp_path):
  ref_dir = reference_run[1]
  part = tmp_path / 'part'
  trainer.train_and_evaluate(tiny_config(total_steps=3), str(part))
  # Resume on 2 devices instead of 8 and finish.
  trainer.train_and_evaluate(tiny_config(**{'mesh.devices': 2}), str(part))
  a = [r['loss'] for r in read_metrics(ref_dir)]
  b = [r['loss'] for r in read_metrics(part)]
  assert len(b) == 6
  np.testing.assert_allclose(a, b, rtol=1e-5)
  # Another device count reduces in another order: tight everywhere, except where the true
  # gradient is exactly zero (the key bias), which is held to Adam's own bound (tests/trained.py).
  optim = tiny_config().optim
  assert_trained_params_close(checkpoint.restore_params(str(part)),
                              checkpoint.restore_params(str(ref_dir)),
                              lrs=[r['lr'] for r in read_metrics(ref_dir)], b1=optim.b1,
                              b2=optim.b2)


@pytest.mark.parametrize('first,then', [
    (False, True), pytest.param(True, False, marks=pytest.mark.slow)])
def test_resume_converts_the_block_layout(reference_run, tmp_path, first, then):
  """A checkpoint of unrolled blocks resumes with model.scan_layers=True (and back): the
  state is converted on restore and the run finishes as the uninterrupted one (a scanned
  stack draws its init per layer from split keys: a scanned run has its own reference)."""
  ref_dir = reference_run[1]
  if first:
    ref_dir = tmp_path / 'ref'
    trainer.train_and_evaluate(tiny_config(**{'model.scan_layers': True}), str(ref_dir))
  part = tmp_path / 'part'
  trainer.train_and_evaluate(tiny_config(total_steps=3, **{'model.scan_layers': first}),
                             str(part))
  trainer.train_and_evaluate(tiny_config(**{'model.scan_layers': then}), str(part))
  np.testing.assert_allclose([r['loss'] for r in read_metrics(part)],
                             [r['loss'] for r in read_metrics(ref_dir)], rtol=1e-5)
  params = checkpoint.restore_params(str(part))
  assert layout.is_scanned(params) == then
  optim = tiny_config().optim
  assert_trained_params_close(layout.unstack_blocks(params),
                              layout.unstack_blocks(checkpoint.restore_params(str(ref_dir))),
                              lrs=[r['lr'] for r in read_metrics(ref_dir)], b1=optim.b1,
                              b2=optim.b2)


@pytest.mark.parametrize('damage', ['cut short', 'stray bytes'])
def test_damaged_metrics_and_config_never_wedge_the_workdir(reference_run, tmp_path, capsys,
                                                            damage):
  """Issue 28.2: a metrics.jsonl tail cut short or followed by stray bytes, and a truncated or
  empty config.json, stopped every re-run with a bare JSON error. Now the log's broken tail is
  dropped and config.json comes back from the checkpoint, each said in one line, and the
  resumed run (checkpoint 6 removed: it redoes steps 4-6) matches the reference."""
  import shutil
  work = tmp_path / 'w'
  shutil.copytree(reference_run[1], work)
  shutil.rmtree(work / 'checkpoints' / '6')
  metrics, config = work / 'metrics.jsonl', work / 'config.json'
  text = metrics.read_bytes()
  if damage == 'cut short':
    metrics.write_bytes(text[:-40])           # the last record loses its end
    config.write_bytes(config.read_bytes()[:700])
  else:
    stray = np.random.RandomState(0).bytes(300).replace(b'\n', b'x')  # not UTF-8, one line
    metrics.write_bytes(text + stray)
    config.write_bytes(b'')
  capsys.readouterr()
  trainer.train_and_evaluate(tiny_config(), str(work))
  err = [l for l in capsys.readouterr().err.splitlines() if 'warning' in l]
  assert len(err) == 2, err
  assert err[0].startswith(f'mimjax: warning: {config} is damaged (') and err[0].endswith(
      f'restored it from the config saved in {work}/checkpoints/3')
  assert err[1] == (f'mimjax: warning: {metrics}: dropped 1 damaged line(s) (not a JSON record: '
                    f'cut short or stray bytes); kept 3 record(s)')
  assert json.loads(config.read_text()) == json.loads((reference_run[1] / 'config.json').read_text())
  assert [r['loss'] for r in read_metrics(work)] == [r['loss'] for r in read_metrics(reference_run[1])]


def test_random_in_place_damage_to_a_checkpoint_then_rerun_finishes_identically(
    reference_run, tmp_path, capsys):
  """Issue 28.1: random bytes written over part of a random array file of the latest checkpoint
  (its size unchanged); the re-run sets it aside, resumes from the one before, finishes, and
  matches the uninterrupted run bit for bit."""
  import shutil
  from tests.train.test_workdir import _overwrite_in_place
  work = tmp_path / 'w'
  shutil.copytree(reference_run[1], work)
  latest = work / 'checkpoints' / '6'
  rng = np.random.RandomState(28)
  arrays = [f for f in checkpoint._checkpoint_files(str(latest)) if '/d/' in f]  # array data
  victim = arrays[rng.randint(len(arrays))]
  _overwrite_in_place(str(latest / victim), rng, size=5000)
  capsys.readouterr()
  trainer.train_and_evaluate(tiny_config(), str(work))
  err = capsys.readouterr().err
  assert f'checkpoint {latest} is damaged' in err and 'resuming from step 3' in err, err
  assert os.listdir(work / 'checkpoints.corrupt') == ['6']
  ref = reference_run[1]
  assert read_metrics(work) == [dict(r, img_per_s=w['img_per_s']) for r, w in
                                zip(read_metrics(ref), read_metrics(work))]
  for x, y in zip(jax.tree.leaves(checkpoint.restore_params(str(ref))),
                  jax.tree.leaves(checkpoint.restore_params(str(work)))):
    np.testing.assert_array_equal(x, y)


def test_damaged_config_without_a_checkpoint_copy_is_one_line(tmp_path):
  (tmp_path / 'config.json').write_text('{"model": {"variant": "B/16", ')
  with pytest.raises(ValueError) as e:
    checkpoint.read_config_json(str(tmp_path))
  assert str(e.value) == (
      f'{tmp_path}/config.json is damaged (Expecting property name enclosed in double quotes: '
      'line 1 column 31 (char 30)) and no checkpoint holds a readable copy; put back a good copy, '
      "or delete it (a training re-run then writes the command's config without comparing it "
      "to the old run's)")


def test_failing_evaluator_does_not_cost_the_checkpoint(tmp_path):
  """Issue 14.9 (found on DINO): the step is saved before its evaluators run. The reference
  run's config, so its compiled step is reused from the persistent cache."""
  config = tiny_config(checkpoint_every=3)
  config.eval_every = 3   # when the objective's own evaluate runs
  config.evals = {}
  def boom(params, state):
    raise RuntimeError('evaluator failed')
  objective = dataclasses.replace(mae.make(config), evaluate=boom)
  with pytest.raises(RuntimeError, match='evaluator failed'):
    trainer.train_and_evaluate(config, str(tmp_path / 'w'), objective)
  assert sorted(os.listdir(tmp_path / 'w' / 'checkpoints')) == ['3']


def _nan_at(config, steps):
  """The tiny MAE objective with a NaN loss on the updates from `steps` (0-based step arg)."""
  base = mae.make(config)

  def loss(params, state, batch, rng, step):
    value, aux = base.loss(params, state, batch, rng, step)
    return jax.numpy.where(jax.numpy.isin(step, jax.numpy.asarray(steps)), jax.numpy.nan,
                           value), aux
  return Objective(init=base.init, loss=loss)


def test_nonfinite_step_stops_at_once_and_schedules_never_lag(tmp_path):
  """Issue 28.8: a skipped step used to roll back optax's count while training went on to the
  next checkpoint, so the lr applied lagged the lr logged. Now the run stops at the first
  non-finite step (as the MAE/DINO reference code does), logs it, and saves nothing after it;
  every checkpoint's optimizer count equals its step. Issue 28.7: param_norm of the skipped
  step is the kept params' norm, not NaN. Issue 28.1: a NaN on the first step after a resume
  blames the checkpoint it resumed from, not 'intact'."""
  config = tiny_config(total_steps=8, checkpoint_every=2, log_every=1)
  objective = _nan_at(config, [4])  # the update that makes step 5
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'^step 5 had a NaN/Inf loss or gradient \(loss nan, grad_norm 0.0; the '
                           r'update was not applied\); stopping: the last good checkpoint \(step '
                           r'4\) in .* is intact'):
    trainer.train_and_evaluate(config, str(tmp_path), objective)
  rows = read_metrics(tmp_path)
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5]  # stopped at once, the NaN step logged
  assert rows[-1]['loss'] == 'nan' and isinstance(rows[-1]['param_norm'], float)
  assert rows[-1]['param_norm'] == pytest.approx(rows[-2]['param_norm'], rel=1e-6)  # kept
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  saved = checkpoint.restore_train_state(str(tmp_path))
  counts = [int(x) for x in jax.tree.leaves(saved['opt_state']) if np.ndim(x) == 0]
  assert counts and all(c == int(saved['step']) == 4 for c in counts)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved['params']))
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'the first step after resuming from .*/checkpoints/4 had a NaN/Inf '
                           r'.* that checkpoint is suspect \(its files match the digests .*\); '
                           r'to resume from the one before it, move it aside: mv '):
    trainer.train_and_evaluate(config, str(tmp_path), objective)


def _main_cmd(workdir, *extra):
  return [sys.executable, '-m', 'mimjax.main', '--config', 'configs/mae.py:tiny',
          '--workdir', str(workdir), '--config.batch_size=16', '--config.log_every=1',
          '--config.data.worker_count=0', '--config.async_checkpoint=False', *extra]


def _env(devices=1):
  return subprocess_env(devices)


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])  # preemption, Ctrl-C
def test_signal_saves_and_exits_cleanly(tmp_path, sig):
  proc = subprocess.Popen(_main_cmd(tmp_path, '--config.total_steps=100000',
                                    '--config.checkpoint_every=100000'),
                          cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600  # start-up on a loaded 2-core machine can take minutes
  while time.time() < deadline:
    metrics = tmp_path / 'metrics.jsonl'
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(sig)
  assert proc.wait(timeout=120) == 0
  steps = os.listdir(tmp_path / 'checkpoints')
  assert len(steps) == 1 and int(steps[0]) >= 3
  assert f'{sig.name} received: saved step {steps[0]}, exiting' in proc.stderr.read()


def test_bad_model_variant_is_one_clear_error_and_no_workdir(tmp_path):
  """A bad value or unknown key (`--config.batch_size=0`, `--config.bogus=1`): test_main."""
  work = tmp_path / 'w'
  out = subprocess.run(_main_cmd(work, '--config.model.variant=Q/16'), cwd=REPO, env=_env(),
                       capture_output=True, text=True)
  assert out.returncode != 0
  assert 'model.variant' in out.stderr
  assert not work.exists()


def _history(workdir):
  with open(os.path.join(workdir, 'history.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_resume_rules_leftover_config_changes_width_and_extension(tmp_path, capsys):
  work = str(tmp_path)
  # A run that died after writing config.json, before its first checkpoint (here: another
  # batch size, as after a config error) plus a temp file: the next run starts afresh.
  # It had logged steps before it died: they are redone, not kept beside the new ones.
  checkpoint.write_config(work, tiny_config(batch_size=6))
  (tmp_path / '.config.json.tmp4242').write_text('{}')
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": 99.0}\n{"step": 2, "loss": 98.0}\n')
  trainer.train_and_evaluate(tiny_config(total_steps=2, checkpoint_every=2), work)
  assert json.loads((tmp_path / 'config.json').read_text())['batch_size'] == 16
  # Keys that change what is trained are refused, naming both values, before anything runs.
  with pytest.raises(ValueError, match=r"mask_ratio: 0.75 → 0.5, norm_pix: True → False\); "
                                       r"pass --allow_config_change"):
    trainer.train_and_evaluate(tiny_config(total_steps=2, mask_ratio=0.5, norm_pix=False), work)
  with pytest.raises(ValueError, match="model.variant: 'mu/4' → 'Ti/16'"):
    trainer.train_and_evaluate(tiny_config(**{'model.variant': 'Ti/16'}), work)
  with pytest.raises(ValueError, match=r'model.num_heads: 4 → 2\)'):  # the effective value, not None
    trainer.train_and_evaluate(tiny_config(**{'model.num_heads': 2}), work)
  # Overridden, a width change is still one line naming the param, not orbax's shape error.
  with pytest.raises(ValueError, match=r'does not fit this model: params/decoder/embed/kernel: '
                                       r'checkpoint \(64, 32\) vs model \(192, 32\)'):
    trainer.train_and_evaluate(tiny_config(**{'model.variant': 'Ti/16'}), work,
                               allow_config_change=True)
  # Extending a finished run is said in one line and recorded.
  capsys.readouterr()
  trainer.train_and_evaluate(tiny_config(total_steps=4, checkpoint_every=2, log_every=2), work)
  err = capsys.readouterr().err
  assert 'extending the run from 2 to 4 steps: the learning-rate schedule is recomputed' in err
  assert json.loads((tmp_path / 'config.json').read_text())['total_steps'] == 4
  history = _history(work)
  assert [h['event'] for h in history] == ['start', 'resume']
  assert history[1]['step'] == 2 and history[1]['changes']['total_steps'] == [2, 4]
  assert [r['step'] for r in read_metrics(work)] == [1, 2, 4]
  assert all(r['loss'] < 90 for r in read_metrics(work))
  assert not [n for n in os.listdir(work) if '.tmp' in n and n != '.config.json.tmp4242']


def test_second_trainer_on_a_workdir_refuses(tmp_path):
  code = ('import time; from mimjax import workdir; '
          f'workdir.WorkdirLock({str(tmp_path)!r}).acquire(); print("locked", flush=True); '
          'time.sleep(600)')
  holder = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env=dict(_env(), PYTHONPATH=REPO))
  try:
    assert holder.stdout.readline().strip() == 'locked'
    out = subprocess.run(_main_cmd(tmp_path, '--config.total_steps=2'), cwd=REPO, env=_env(),
                         capture_output=True, text=True)
  finally:
    holder.kill()
    holder.wait()
  assert out.returncode == 2
  assert f'mimjax: error: {tmp_path} is in use by pid {holder.pid}' in out.stderr
  assert not (tmp_path / 'checkpoints').exists() and not (tmp_path / 'metrics.jsonl').exists()


def _kill_at_random_moments(work, steps, kills, seed):
  """Starts the run `kills` times, SIGKILLs each after a random delay, then lets it finish."""
  rng = np.random.RandomState(seed)
  for _ in range(kills):
    proc = subprocess.Popen(_main_cmd(work, *steps), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = work / 'metrics.jsonl'
    done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    # Wait for 0-4 new steps (0: before the first step or checkpoint), then a random delay so
    # the kill lands anywhere: mid-step, mid-save, between saves.
    target, deadline = done + rng.randint(0, 5), time.time() + 180
    while time.time() < deadline and proc.poll() is None:
      if metrics.exists() and len(metrics.read_text().splitlines()) >= target:
        break
      time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.3))
    proc.kill()
    proc.wait()
  subprocess.run(_main_cmd(work, *steps), cwd=REPO, env=_env(), check=True, capture_output=True)


def _assert_same_run(ref, work, total):
  a, b = read_metrics(ref), read_metrics(work)
  assert [r['step'] for r in b] == list(range(1, total + 1))
  assert [r['loss'] for r in a] == [r['loss'] for r in b]
  for x, y in zip(jax.tree.leaves(checkpoint.restore_params(str(ref))),
                  jax.tree.leaves(checkpoint.restore_params(str(work)))):
    np.testing.assert_array_equal(x, y)


# Crops on the device, as paper rows cut them (configs/common.py: paper_speed): the host draws
# boxes and flips from each example's seeded generator, the step cuts the views.
FAULT_STEPS = ['--config.total_steps=12', '--config.checkpoint_every=2',
               '--config.data.crop_on=device', '--config.data.canvas_size=(32, 32)']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  ref = tmp_path_factory.mktemp('ref')
  subprocess.run(_main_cmd(ref, *FAULT_STEPS), cwd=REPO, env=_env(), check=True,
                 capture_output=True)
  return ref


def test_kill9_then_rerun_matches_uninterrupted_run(tmp_path, uninterrupted):
  """kill -9 mid-run past a checkpoint, re-run the same command: identical losses and params."""
  proc = subprocess.Popen(_main_cmd(tmp_path, *FAULT_STEPS), cwd=REPO, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics, deadline = tmp_path / 'metrics.jsonl', time.time() + 300
  while time.time() < deadline and proc.poll() is None:  # under way past checkpoint 4
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      break
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert len(metrics.read_text().splitlines()) < 12, 'the run finished before the kill'
  subprocess.run(_main_cmd(tmp_path, *FAULT_STEPS), cwd=REPO, env=_env(), check=True,
                 capture_output=True)
  _assert_same_run(uninterrupted, tmp_path, 12)


def test_interrupted_message_names_the_intact_checkpoint(tmp_path):
  """Issue 28.7: a second Ctrl-C said 'nothing to save yet' although checkpoint 10 existed."""
  from mimjax import main
  assert main._interrupted_state(str(tmp_path)) == (
      'nothing saved yet; re-run the same command to start again')
  for step in ('4', '10'):
    (tmp_path / 'checkpoints' / step).mkdir(parents=True)
  assert main._interrupted_state(str(tmp_path)) == (
      f'checkpoint 10 in {tmp_path}/checkpoints is intact; re-run the same command to resume '
      'from it')


def test_random_sigkills_then_finish_match_uninterrupted_run(tmp_path, uninterrupted):
  """Fault injection: kill -9 a few times at random moments; the finished run is identical."""
  _kill_at_random_moments(tmp_path, FAULT_STEPS, kills=3, seed=0)
  _assert_same_run(uninterrupted, tmp_path, 12)


@pytest.mark.slow
@pytest.mark.parametrize('seed', [1, 2])
def test_many_random_sigkills_then_finish_match_uninterrupted_run(tmp_path, uninterrupted, seed):
  _kill_at_random_moments(tmp_path, FAULT_STEPS, kills=12, seed=seed)
  _assert_same_run(uninterrupted, tmp_path, 12)


def test_tiny_mae_loss_falls(tmp_path):
  config = tiny_config(total_steps=60, batch_size=32, log_every=5, checkpoint_every=60)
  trainer.train_and_evaluate(config, str(tmp_path))
  losses = [r['loss'] for r in read_metrics(tmp_path)]
  assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:2])


def test_linear_probe_on_a_workdir_without_checkpoints_leaves_nothing(tmp_path):
  from configs.eval import linear
  pretrained = tmp_path / 'pre'
  pretrained.mkdir()
  checkpoint.write_config(str(pretrained), tiny_config())  # config.json only: killed early
  config = linear.get_config('tiny')
  config.pretrained = str(pretrained)
  config.data.worker_count = 0
  with pytest.raises(FileNotFoundError, match='no checkpoints/<step>/ and no params/'):
    trainer.train_and_evaluate(config, str(tmp_path / 'E'))
  assert not (tmp_path / 'E').exists()


def test_monitor_whose_split_is_missing_is_skipped_with_one_warning(tmp_path, capsys):
  """Evaluators declare the splits they read (Evaluator.SPLIT_KEYS); the trainer skips one whose
  split the data set lacks at start-up, with one line, instead of failing after training."""
  import ml_collections
  from mimjax.data.builders import tfds_io
  from mimjax import sharding
  def examples():
    rng = np.random.default_rng(0)
    for i in range(8):
      yield i, {'image': tfds_io.encode_image(rng.integers(0, 256, (32, 32, 3), np.uint8)),
                'label': i % 2}
  config = tiny_config()
  config.data.data_dir = tfds_io.write_tfds(str(tmp_path / 'data'), 'digits',
                                            tfds_io.features_dict(['a', 'b']),
                                            {'train': examples})
  config.evals = ml_collections.ConfigDict({
      'lin': {'module': 'linear', 'every_steps': 1},
      'lin_on_train': {'module': 'linear', 'test_split': 'train'},
      'spectrum': {'module': 'spectrum'}})
  evaluators = trainer.make_evaluators(config, mae.make(config),
                                       sharding.make_mesh(config.mesh))
  assert [e.name for e in evaluators] == ['lin_on_train']
  assert evaluators[0].splits == ('train', 'train')
  err = capsys.readouterr().err.splitlines()
  assert [line for line in err if 'warning' in line] == [
      "mimjax: warning: config.evals.lin skipped: data set 'digits' has no split 'test'",
      "mimjax: warning: config.evals.spectrum skipped: data set 'digits' has no split 'test'"]


def test_runs_are_announced_by_their_method_name():
  from configs import maskfeat, mre_dino, mre_mae
  names = {m.__name__.split('.')[-1]: trainer._method_name(m.get_config('tiny'))
           for m in (maskfeat, mre_dino, mre_mae)}
  assert names == {'maskfeat': 'maskfeat', 'mre_dino': 'mre_dino', 'mre_mae': 'mre_mae'}
  assert trainer._method_name(tiny_config()) == 'mae'
  # mre_dino's tiny row trains on the unlabelled photos: no kNN monitor that would skip itself
  assert not mre_dino.get_config('tiny').evals


def test_resume_is_exact_with_device_augmentation(tmp_path):
  """DINO tiny, its crops cut and its colour jitter / blur / solarize drawn in the train step
  (crop_on='device', the paper rows' default): a run resumed from its step-2 checkpoint (the
  last one written before a kill) redoes steps 3–4 exactly as the uninterrupted run did — the
  boxes come from each example's seeded generator, the photometric key from the checkpointed
  step key."""
  import shutil
  from configs import dino as dino_config
  config = dino_config.get_config('tiny')
  config.update(batch_size=8, total_steps=4, log_every=1, checkpoint_every=2,
                async_checkpoint=False)
  config.data.update(worker_count=0, crop_on='device', canvas_size=(32, 32))
  config.evals = {}
  assert config.data.augment_on == 'device'
  ref, part = tmp_path / 'ref', tmp_path / 'part'
  trainer.train_and_evaluate(config, str(ref))
  shutil.copytree(ref, part)
  shutil.rmtree(part / 'checkpoints' / '4')  # killed after saving step 2, before step 4
  trainer.train_and_evaluate(config, str(part))
  a, b = read_metrics(ref), read_metrics(part)
  assert [r['step'] for r in b] == [1, 2, 3, 4]
  assert [r['loss'] for r in a] == [r['loss'] for r in b]
  for x, y in zip(jax.tree.leaves(checkpoint.restore_params(str(ref))),
                  jax.tree.leaves(checkpoint.restore_params(str(part)))):
    np.testing.assert_array_equal(x, y)
