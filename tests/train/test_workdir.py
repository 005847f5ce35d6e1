"""Workdir safety: atomic publishes, the run lock, stale temp files, config-change rules, and
the fallback from a corrupt checkpoint to the newest intact one."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mimjax import checkpoint, workdir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_atomic_write_replaces_existing_file_and_leaves_no_temp(tmp_path):
  path = str(tmp_path / 'config.json')
  workdir.atomic_write(path, 'old')
  workdir.atomic_write(path, 'new')  # the destination exists: replaced, not FileExistsError
  workdir.atomic_write(str(tmp_path / 'b.bin'), lambda f: f.write(b'\x00\x01'))
  assert open(path).read() == 'new'
  assert open(tmp_path / 'b.bin', 'rb').read() == b'\x00\x01'
  assert sorted(os.listdir(tmp_path)) == ['b.bin', 'config.json']


def test_write_config_over_leftovers_of_a_killed_run(tmp_path):
  """config.json and a temp file of a run killed before its first checkpoint."""
  config = ml_collections.ConfigDict({'a': 1})
  (tmp_path / 'config.json').write_text('{"a": 0}')
  (tmp_path / '.config.json.tmp123').write_text('{"a": 0}')
  checkpoint.write_config(str(tmp_path), config)
  assert json.loads((tmp_path / 'config.json').read_text()) == {'a': 1}


def _holder(path):
  """A child process that takes the lock, says so, and sleeps until killed."""
  code = ('import sys, time; from mimjax import workdir; '
          f'workdir.WorkdirLock({path!r}).acquire(); print("locked", flush=True); time.sleep(600)')
  proc = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, stdout=subprocess.PIPE,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.stdout.readline().strip() == 'locked'
  return proc


def test_lock_refuses_a_second_run_and_a_killed_holder_does_not_wedge(tmp_path):
  proc = _holder(str(tmp_path))
  try:
    with pytest.raises(workdir.WorkdirLockedError, match=f'in use by pid {proc.pid} on '):
      workdir.WorkdirLock(str(tmp_path)).acquire()
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  # The lock file is still there (with the dead pid in it), but the lock died with its owner.
  assert json.loads((tmp_path / '.lock').read_text())['pid'] == proc.pid
  with workdir.WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / '.lock').read_text())['pid'] == os.getpid()


def test_remove_stale_temp_only_touches_dead_processes(tmp_path):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True).stdout.strip()
  stale = os.path.basename(workdir.temp_name(str(tmp_path / 'digits'))).replace(
      f'-{os.getpid()}-', f'-{dead}-')
  live = os.path.basename(workdir.temp_name(str(tmp_path / 'digits')))
  for name in (stale, live):
    os.makedirs(tmp_path / name / 'digits')
  (tmp_path / 'digits').mkdir()
  assert workdir.remove_stale_temp(str(tmp_path), prefix='.digits.') == [stale]
  assert sorted(os.listdir(tmp_path)) == sorted([live, 'digits'])


def test_config_changes_allowed_and_refused():
  old = {'total_steps': 300, 'log_every': 10, 'mask_ratio': 0.75,
         'model': {'num_heads': 8, 'attention': 'xla'}, 'data': {'data_dir': '/a', 'name': 'x'},
         'evals': {'knn': {'every_steps': 5}}}
  new = {'total_steps': 600, 'log_every': 20, 'mask_ratio': 0.5,
         'model': {'num_heads': 4, 'attention': 'fused'}, 'data': {'data_dir': '/b', 'name': 'x'},
         'evals': {'knn': {'every_steps': 7}}}
  changes = workdir.config_changes(old, new)
  assert set(changes) == {'total_steps', 'log_every', 'mask_ratio', 'model.num_heads',
                          'model.attention', 'data.data_dir', 'evals.knn.every_steps'}
  refused = workdir.refused_changes(changes)
  assert refused == {'mask_ratio': (0.75, 0.5), 'model.num_heads': (8, 4)}
  assert workdir.describe_changes(refused) == 'mask_ratio: 0.75 → 0.5, model.num_heads: 8 → 4'


def test_output_dir_that_is_a_file(tmp_path):
  (tmp_path / 'f').write_text('x')
  with pytest.raises(ValueError, match='exists and is not a directory'):
    workdir.check_output_dir(str(tmp_path / 'f'))
  workdir.check_output_dir(str(tmp_path / 'new'))  # not there yet: fine


@pytest.mark.skipif(os.geteuid() == 0, reason='root may write anywhere')
def test_read_only_parent_is_one_line(tmp_path):
  os.chmod(tmp_path, 0o555)
  try:
    with pytest.raises(PermissionError, match=f'--workdir {tmp_path}/w: {tmp_path} is not '):
      workdir.check_writable(str(tmp_path / 'w'))
  finally:
    os.chmod(tmp_path, 0o755)


# --- corrupt checkpoints: a tiny state, no training needed ---

def _state(value):
  w = np.random.RandomState(value).randn(256, 64).astype(np.float32)  # incompressible
  return {'params': {'w': jnp.asarray(w)}, 'state': {},
          'step': jnp.asarray(value, jnp.int32)}


def _abstract(shape=(256, 64)):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {'params': {'w': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)},
          'state': {}, 'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)}


def _two_checkpoints(root):
  ckpt = checkpoint.Checkpointer(str(root), async_save=False)
  for step in (2, 4):
    ckpt.save(step, _state(step), {'pos': step}, ml_collections.ConfigDict({'s': step}))
  ckpt.close()


def _largest_array_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / 'state') for f in fs
           if os.sep + 'd' + os.sep in os.path.join(r, f)]
  return max(files, key=os.path.getsize)


def _truncate(path, keep_fraction=0.0):
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(int(size * keep_fraction))


@pytest.mark.parametrize('damage', ['truncated array file', 'zero-byte data/metadata',
                                    'zero-byte manifest.ocdbt'])
def test_corrupt_latest_checkpoint_falls_back_to_newest_intact(tmp_path, capsys, damage):
  _two_checkpoints(tmp_path)
  step4 = tmp_path / 'checkpoints' / '4'
  if damage == 'truncated array file':
    _truncate(_largest_array_file(step4), 0.5)
  elif damage == 'zero-byte data/metadata':
    _truncate(step4 / 'data' / 'metadata')
  else:
    _truncate(step4 / 'state' / 'manifest.ocdbt')
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  step, state, data = ckpt.restore_latest(_abstract())
  ckpt.close()
  assert step == 2 and data == {'pos': 2}
  np.testing.assert_array_equal(state['params']['w'], _state(2)['params']['w'])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err  # one warning, no asyncio/absl spew
  assert f'checkpoint {step4} is damaged' in lines[0] and 'resuming from step 2' in lines[0]
  # Kept for inspection, out of the way of the step-4 checkpoint the resumed run will write.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  assert os.listdir(tmp_path / 'checkpoints.corrupt') == ['4']
  history = [json.loads(l) for l in (tmp_path / 'history.jsonl').read_text().splitlines()]
  assert history[-1]['event'] == 'corrupt_checkpoint' and history[-1]['step'] == 4


def test_no_intact_checkpoint_is_one_line_naming_the_files(tmp_path):
  _two_checkpoints(tmp_path)
  for step in ('2', '4'):
    _truncate(tmp_path / 'checkpoints' / step / 'data' / 'metadata')
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  with pytest.raises(ValueError, match='no readable checkpoint: step 4: .*; step 2: ') as e:
    ckpt.restore_latest(_abstract())
  assert '\n' not in str(e.value)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']  # nothing moved or deleted


def test_shape_mismatch_is_one_line_naming_the_param(tmp_path):
  _two_checkpoints(tmp_path)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  with pytest.raises(ValueError, match=r'params/w: checkpoint \(256, 64\) vs model \(4, 5\)') as e:
    ckpt.restore_latest(_abstract((4, 5)))
  assert '\n' not in str(e.value)


# --- content digests: damage that leaves every file readable ---

def _overwrite_in_place(path, rng, size=None):
  """Random bytes over part of a file, its size unchanged (what a bad disk or stray write does)."""
  length = os.path.getsize(path)
  size = min(size or length, length)
  offset = int(rng.randint(0, length - size + 1))
  with open(path, 'r+b') as f:
    f.seek(offset)
    f.write(rng.bytes(size))
  assert os.path.getsize(path) == length


def test_in_place_damage_is_caught_by_digests_and_falls_back(tmp_path, capsys):
  """Issue 28.1: same-size damage inside an uncompressed array file used to restore wrong values
  silently; the digests written after the commit catch it."""
  _two_checkpoints(tmp_path)
  step4 = tmp_path / 'checkpoints' / '4'
  files = json.loads((step4 / checkpoint.DIGESTS).read_text())['files']
  assert set(files) == set(checkpoint._checkpoint_files(str(step4)))  # every file, and only them
  damaged = _largest_array_file(step4)
  _overwrite_in_place(damaged, np.random.RandomState(0), size=5000)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  step, state, data = ckpt.restore_latest(_abstract())
  ckpt.close()
  assert step == 2 and data == {'pos': 2} and ckpt.restored_verified
  np.testing.assert_array_equal(state['params']['w'], _state(2)['params']['w'])
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  rel = os.path.relpath(damaged, step4)
  assert lines == [f'mimjax: warning: checkpoint {step4} is damaged (CorruptCheckpointError: '
                   f'{rel} does not match its sha256 in digests.json (changed after it was '
                   f'written)); moved it to {tmp_path}/checkpoints.corrupt/4 and resuming from '
                   'step 2']


def test_unverified_and_damaged_checkpoints_for_readers(tmp_path):
  """No digests (an older checkpoint): restored, marked unverified. Export/evaluation readers
  (restore_train_state) refuse a damaged step in one line naming it."""
  _two_checkpoints(tmp_path)
  os.remove(tmp_path / 'checkpoints' / '4' / checkpoint.DIGESTS)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  assert ckpt.restore_latest(_abstract())[0] == 4 and ckpt.restored_verified is False
  ckpt.close()
  (tmp_path / 'checkpoints' / '2' / 'data' / 'metadata').write_text('{"pos": 3}')
  with pytest.raises(checkpoint.CorruptCheckpointError,
                     match=r'checkpoints/2: data/metadata does not match its sha256') as e:
    checkpoint.restore_train_state(str(tmp_path), step=2)
  assert '\n' not in str(e.value)


def test_unreadable_checkpoint_warning_names_the_cause_not_tensorstore_internals(tmp_path,
                                                                                capsys):
  """Issue 28.7: the warning showed `<bound method pybind11_detail_...`."""
  _two_checkpoints(tmp_path)
  for step in ('2', '4'):  # without digests, so orbax's own read error is what is reported
    os.remove(tmp_path / 'checkpoints' / step / checkpoint.DIGESTS)
  _truncate(_largest_array_file(tmp_path / 'checkpoints' / '4'), 0.5)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  assert ckpt.restore_latest(_abstract())[0] == 2
  ckpt.close()
  line = capsys.readouterr().err.strip()
  assert 'bound method' not in line and 'OUT_OF_RANGE: Error reading "params.w' in line, line


def test_digests_are_written_off_the_training_thread_after_an_async_commit(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, async_save=True)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {'pos': step}, ml_collections.ConfigDict({'s': step}))
  ckpt.close()  # waits for the commit and the digests
  assert os.listdir(tmp_path / 'checkpoints') == ['3']
  assert checkpoint.verify_digests(str(tmp_path / 'checkpoints' / '3'))


def test_failed_checkpoint_write_is_one_line_naming_the_step_and_what_is_intact(tmp_path):
  """Issue 28.5: a full disk during a save was 325 lines of orbax tracebacks (log records now
  dropped by logs.quiet_library_logs, tested in tests/test_logs.py) before a TensorStore line."""
  _two_checkpoints(tmp_path)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  tmp = tmp_path / 'checkpoints' / '6.orbax-checkpoint-tmp'
  def full(*args, **kwargs):
    raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{tmp}/state/_sharding": '
                     "Failed to write 46518 bytes to file 9: No space left on device "
                     "[os_error_code='28']")
  ckpt.manager.save = full
  with pytest.raises(checkpoint.CheckpointWriteError) as e:
    ckpt.save(6, _state(6), {}, ml_collections.ConfigDict())
  assert str(e.value) == (f'{tmp_path}/checkpoints: writing checkpoint 6 failed (no space left '
                          'on device: free space there or lower --config.keep_checkpoints); '
                          'checkpoint 4 is intact; then re-run the same command')
  ckpt.close()
