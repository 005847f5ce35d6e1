"""launch/ scripts: syntax, --help without gcloud/SLURM, and the commands they would run."""

import os
import pathlib
import shutil
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[2] / 'launch'
SCRIPTS = ['tpu_pod.sh', 'gpu_host.sh', 'slurm.sbatch']


def _bin_without_cloud_tools(tmp_path):
  """A PATH holding only the coreutils the scripts use (no gcloud, srun, nvidia-smi)."""
  bindir = tmp_path / 'bin'
  bindir.mkdir(exist_ok=True)
  for tool in ('bash', 'cat', 'dirname', 'grep', 'tr', 'awk', 'sort', 'printf', 'env'):
    found = shutil.which(tool)
    if found and not (bindir / tool).exists():
      (bindir / tool).symlink_to(found)
  return str(bindir)


def _run(args, tmp_path, env_extra=None, **kw):
  env = dict(os.environ, PATH=_bin_without_cloud_tools(tmp_path), **(env_extra or {}))
  return subprocess.run(['bash', *args], capture_output=True, text=True, env=env, timeout=30, **kw)


@pytest.mark.parametrize('script', SCRIPTS)
def test_bash_syntax(script):
  subprocess.run(['bash', '-n', str(LAUNCH / script)], check=True)


@pytest.mark.parametrize('script', SCRIPTS)
def test_shellcheck(script):
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck not installed')
  subprocess.run(['shellcheck', '-x', str(LAUNCH / script)], check=True)


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_needs_no_cloud_tools(script, tmp_path):
  out = _run([str(LAUNCH / script), '--help'], tmp_path)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith('Usage:') and 'mimjax' in out.stdout


@pytest.mark.parametrize('script', SCRIPTS)
def test_missing_arguments_print_usage_and_fail(script, tmp_path):
  out = _run([str(LAUNCH / script)], tmp_path)
  assert out.returncode == 2
  assert 'Usage:' in out.stderr and 'error:' in out.stderr


def test_tpu_pod_without_gcloud_is_a_clear_error(tmp_path):
  out = _run([str(LAUNCH / 'tpu_pod.sh'), '--name', 'n', '--zone', 'z', 'check'], tmp_path)
  assert out.returncode == 2 and 'gcloud not found' in out.stderr


def test_tpu_pod_run_dry_run_on_all_workers(tmp_path):
  out = _run([str(LAUNCH / 'tpu_pod.sh'), '--name', 'pod', '--zone', 'us-central2-b',
              '--hosts', '4', '--config', 'configs/mae.py:vit_b,in1k', '--workdir', 'gs://b/w',
              '--dry-run', 'run', '--', '--config.seed=1'], tmp_path)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3 and all('tpu-vm ssh pod' in l and '--worker=all' in l for l in lines)
  assert 'libtpu_lockfile' in lines[0]
  assert 'jax.process_count' in lines[1]
  assert 'MIMJAX_DISTRIBUTED=1' in lines[2] and 'mimjax.main' in lines[2]
  assert '--workdir=gs://b/w' in lines[2] and '--config.seed=1' in lines[2]


def test_tpu_pod_multi_host_needs_gcs_workdir(tmp_path):
  out = _run([str(LAUNCH / 'tpu_pod.sh'), '--name', 'pod', '--zone', 'z', '--hosts', '4',
              '--config', 'c', '--workdir', '/tmp/w', '--dry-run', 'run'], tmp_path)
  assert out.returncode == 2 and 'gs://' in out.stderr


def _fake_python(tmp_path):
  """An interpreter that reports where it runs and what it was given."""
  fake = tmp_path / 'fakepython'
  fake.write_text('#!/bin/bash\necho "cwd=$PWD"; echo "PYTHONPATH=$PYTHONPATH"; echo "args=$*"\n')
  fake.chmod(0o755)
  return str(fake)


def test_gpu_host_runs_in_the_callers_directory_and_dry_run_prints_that_command(tmp_path):
  """Relative paths mean what the caller meant: the run happens where the script is called
  (not in the checkout), importing this checkout's mimjax; --dry-run prints that command."""
  caller = tmp_path / 'elsewhere'
  caller.mkdir()
  args = [str(LAUNCH / 'gpu_host.sh'), '--config', 'configs/mae.py:tiny', '--workdir',
          'workdirs/g', '--python', _fake_python(tmp_path), '--no-check', '--',
          '--config.total_steps=5']
  env = {'PYTHONPATH': ''}
  dry = _run(args[:-2] + ['--dry-run'] + args[-2:], tmp_path, cwd=caller, env_extra=env)
  assert dry.returncode == 0, dry.stderr
  root = str(LAUNCH.parent)
  assert dry.stdout.split() == ['env', f'PYTHONPATH={root}', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9',
                                _fake_python(tmp_path), '-m', 'mimjax.main',
                                '--config=configs/mae.py:tiny', '--workdir=workdirs/g',
                                '--config.total_steps=5']
  ran = _run(args, tmp_path, cwd=caller, env_extra=env)
  assert ran.returncode == 0, ran.stderr
  assert ran.stdout.splitlines() == [
      f'cwd={caller}', f'PYTHONPATH={root}',
      'args=-m mimjax.main --config=configs/mae.py:tiny --workdir=workdirs/g '
      '--config.total_steps=5']


def test_tpu_pod_refuses_a_relative_workdir(tmp_path):
  out = _run([str(LAUNCH / 'tpu_pod.sh'), '--name', 'pod', '--zone', 'z', '--hosts', '1',
              '--config', 'configs/mae.py:tiny', '--workdir', 'workdirs/t', '--dry-run', 'run'],
             tmp_path)
  assert out.returncode == 2 and 'relative to ~/mimjax on each worker' in out.stderr
  assert out.stdout == ''


def test_slurm_runs_in_the_submit_directory(tmp_path):
  """srun (faked) starts mimjax.main in SLURM_SUBMIT_DIR, the caller's directory."""
  caller = tmp_path / 'submit'
  caller.mkdir()
  bindir = _bin_without_cloud_tools(tmp_path)
  srun = tmp_path / 'bin' / 'srun'
  srun.write_text('#!/bin/bash\nif [[ "$*" == *"-c "* ]]; then echo "MIMJAX_JOINED 0 1 1"; '
                  'else echo "srun cwd=$PWD args=$*"; fi\n')
  srun.chmod(0o755)
  env = dict(os.environ, PATH=bindir, SLURM_SUBMIT_DIR=str(caller), MIMJAX_PYTHON='py')
  out = subprocess.run(['bash', str(LAUNCH / 'slurm.sbatch'), 'configs/mae.py:tiny', 'runs/s',
                        '--config.seed=1'], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  assert (f'srun cwd={caller} args=--ntasks=1 --kill-on-bad-exit=1 py -m mimjax.main '
          '--config=configs/mae.py:tiny --workdir=runs/s --config.seed=1') in out.stdout
