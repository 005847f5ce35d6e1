"""Every `tiny` row shows what its paper shows, run as its docstring documents it: the
pretraining loss falls, the pretrained encoder's kNN beats the same architecture at init, and
(MAE) fine-tuning beats the linear probe on the same encoder.

Slow (`-m slow`): one test per row, each its full documented command (1-3 minutes on 2 cores).
Default set: the cheapest row (MAE, the README's main job). Figures measured: docs/evaluation.md.
"""

import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mimjax import checkpoint
from mimjax.data import pipeline
from mimjax.objectives import base as objectives
from tests.env import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# row → (config module, kNN pool). The masked-image-modeling losses read patch tokens only and
# leave [CLS] (SemanticMIM: the proxies) nearly untrained in a tiny run, while a random-init
# [CLS] is already a good random feature of such simple glyphs (MAE: kNN 71.4 at init, 66.0
# after 300 steps; mean-pooled 62.3 → 67.7): their kNN reads the mean of the patch tokens
# (MAE's global pool). DINO trains its [CLS].
ROWS = {
    'mae': ('mae', 'mean'),
    'lut': ('lut', 'mean'),
    'maskfeat': ('maskfeat', 'mean'),
    'beit': ('beit', 'mean'),
    'semantic_mim': ('semantic_mim', 'mean'),
    'dino': ('dino', 'cls'),
}
CHEAPEST = 'mae'  # the README's main job: 300 steps, ~65 s wall on 2 loaded cores


def _run(*args, cwd, module='mimjax.main'):
  env = subprocess_env(1, PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, '-m', module, *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, f'{args}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}'
  return out


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['loss'] for r in map(json.loads, f) if 'loss' in r]


def _init_workdir(module: str, workdir: str) -> None:
  """The row's encoder as the trainer initialises it, saved as a params-only workdir."""
  config = importlib.import_module(f'configs.{module}').get_config('tiny')
  objective = objectives.load(config.objective).make(config)
  loader = pipeline.make_loader(config.data, global_batch_size=config.batch_size, seed=0,
                                split='train', train=True)
  example = jax.tree.map(lambda x: np.asarray(x[:1]), next(loader))
  params, _ = objective.init(jax.random.split(jax.random.key(config.seed))[0], example)
  checkpoint.save_params(workdir, config, jax.device_get(params))


def _knn(pretrained: str, pool: str, tmp_path, name: str) -> float:
  _run('--config', f'configs/eval/knn.py:tiny,pool={pool}', '--workdir', str(tmp_path / name),
       f'--config.pretrained={pretrained}', cwd=tmp_path)
  with open(tmp_path / name / 'results.json') as f:
    return json.load(f)['knn/top1']


def check_row(row: str, tmp_path) -> dict:
  """Runs the row's documented command, returns its direction figures, asserts them."""
  module, pool = ROWS[row]
  workdir = str(tmp_path / row)
  out = _run('--config', f'configs/{module}.py:tiny', '--workdir', workdir, cwd=tmp_path)
  assert 'loss ' in out.stderr  # the periodic progress lines (stderr is not a terminal here)
  losses = _losses(workdir)
  _init_workdir(module, str(tmp_path / 'init'))
  knn, knn_init = (_knn(workdir, pool, tmp_path, 'knn'),
                   _knn(str(tmp_path / 'init'), pool, tmp_path, 'knn_init'))
  figures = {'loss_first': losses[0], 'loss_last': losses[-1], 'knn': knn, 'knn_init': knn_init}
  print(row, figures)
  # The last logged losses below the first ones (means of 2: single batches are noisy).
  assert np.mean(losses[-2:]) < np.mean(losses[:2]), figures
  assert knn >= knn_init, figures
  return figures


def test_cheapest_tiny_row_shows_the_papers_direction(tmp_path):
  check_row(CHEAPEST, tmp_path)


# LUT's tiny row: its loss falls, but its encoder's kNN ends below the init's (100 steps:
# 52.9 vs 60.9 mean-pooled; 300 steps 53.9; α 0.25 51.2). Not the BC loss (α = 0 gives the
# same): LUT's simple-crop views give MAE's loss no kNN gain on 32-px digits, within a ±6-point
# seed spread (docs/evaluation.md, tiny rows). Strict: the day it passes, this mark must go.
_NOT_YET = {'lut': 'LUT tiny: kNN below init (docs/evaluation.md, tiny rows)'}


@pytest.mark.slow
@pytest.mark.parametrize('row', [
    pytest.param(r, marks=[pytest.mark.xfail(strict=True, reason=_NOT_YET[r])] if r in _NOT_YET
                 else []) for r in sorted(set(ROWS) - {CHEAPEST})])
def test_tiny_row_shows_the_papers_direction(row, tmp_path):
  check_row(row, tmp_path)


@pytest.mark.slow
def test_tiny_mae_fine_tuning_beats_linear_probing(tmp_path):
  """MAE's own comparison on the README's encoder: fine-tuning ≥ linear probing."""
  _run('--config', 'configs/mae.py:tiny', '--workdir', str(tmp_path / 'mae'), cwd=tmp_path)
  results = {}
  for protocol in ('finetune', 'linear'):
    _run('--config', f'configs/eval/{protocol}.py:tiny', '--workdir', str(tmp_path / protocol),
         f'--config.pretrained={tmp_path / "mae"}', cwd=tmp_path)
    with open(tmp_path / protocol / 'results.json') as f:
      results[protocol] = json.load(f)['eval/top1']
  assert results['finetune'] >= results['linear'], results


@pytest.mark.slow
def test_mre_rows_losses_fall(tmp_path):
  """MRE-MAE, its KD student and MRE-DINO as their docstrings run them, on the SAM stage's
  superpixel masks of the 18 embedded photos (unlabelled: no kNN): every loss falls."""
  _run('--config', 'configs/sam.py:tiny,superpixel', '--workdir', 'sp', cwd=tmp_path,
       module='mimjax.sam')
  data = ('--config.data.name=photos', f'--config.data.data_dir={tmp_path / "sp"}',
          '--config.batch_size=16')
  _run('--config', 'configs/mre_mae.py:tiny', '--workdir', 'mre_mae', *data, cwd=tmp_path)
  _run('--config', 'configs/distill.py:tiny', '--workdir', 'kd',
       f'--config.teacher={tmp_path / "mre_mae"}', *data, cwd=tmp_path)
  _run('--config', 'configs/mre_dino.py:tiny', '--workdir', 'mre_dino', *data, cwd=tmp_path)
  for run in ('mre_mae', 'kd', 'mre_dino'):
    losses = _losses(str(tmp_path / run))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), (run, losses)
