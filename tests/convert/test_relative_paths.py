"""Every workdir a user types works relative to where they stand (issue: orbax needs absolute
paths; `mimjax.checkpoint.resolve` makes them so once for every caller)."""

import os
import subprocess
import sys

import jax
import numpy as np

from configs import mae as mae_config
from mimjax import checkpoint
from mimjax.objectives import mae
from mimjax.objectives import pretrained
from tests.env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(cwd, *args):
  env = subprocess_env(1, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'mimjax.convert', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_relative_workdirs_convert_and_load(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = mae_config.get_config('tiny')
  shapes, _ = jax.eval_shape(mae.make(config).init, jax.random.key(0),
                             {'image': np.zeros((1, 32, 32, 3), np.uint8)})
  params = jax.tree.map(lambda x: np.full(x.shape, 0.01, x.dtype), shapes)
  # A train checkpoint written the way `python -m mimjax.main --workdir workdirs/mae_tiny` does.
  ckpt = checkpoint.Checkpointer('workdirs/mae_tiny', async_save=False)
  ckpt.save(2, {'params': params, 'opt_state': {'count': np.zeros((), np.int32)}, 'state': {},
                'step': np.asarray(2, np.int32)}, {}, config, force=True)
  ckpt.close()
  checkpoint.write_config('workdirs/mae_tiny', config)
  assert os.path.isdir(tmp_path / 'workdirs/mae_tiny/checkpoints/2')

  run = _cli(tmp_path, '--workdir', 'workdirs/mae_tiny', '--format', 'timm', '--out',
             'model.safetensors', '--verify')
  assert run.returncode == 0, run.stderr
  assert 'ok' in run.stdout and os.path.isfile(tmp_path / 'model.safetensors')
  run = _cli(tmp_path, '--from', 'timm', '--in', 'model.safetensors', '--workdir', 'W2rel')
  assert run.returncode == 0, run.stderr
  # --config.pretrained=<relative> and --config.init_from=<relative> go through this loader.
  for workdir in ('workdirs/mae_tiny', 'W2rel', './W2rel'):
    loaded = pretrained.load_pretrained(workdir)
    np.testing.assert_array_equal(loaded.encoder['cls_token'], params['encoder']['cls_token'])
  assert checkpoint.load_config('W2rel').converted_from == str(tmp_path / 'model.safetensors')
