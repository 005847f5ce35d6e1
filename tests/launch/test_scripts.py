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
  bindir.mkdir()
  for tool in ('bash', 'cat', 'dirname', 'grep', 'tr', 'awk', 'sort', 'printf'):
    found = shutil.which(tool)
    if found:
      (bindir / tool).symlink_to(found)
  return str(bindir)


def _run(args, tmp_path, **kw):
  env = dict(os.environ, PATH=_bin_without_cloud_tools(tmp_path))
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


def test_gpu_host_dry_run(tmp_path):
  out = _run([str(LAUNCH / 'gpu_host.sh'), '--config', 'configs/mae.py:tiny', '--workdir', 'W',
              '--python', 'python3', '--dry-run', '--', '--config.total_steps=5'], tmp_path)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ['python3', '-m', 'mimjax.main', '--config=configs/mae.py:tiny',
                                '--workdir=W', '--config.total_steps=5']
