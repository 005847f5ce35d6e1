"""End to end on a tiny MAE workdir (20 steps): kNN + linear probe write results.json."""

import json
import os
import re

import jax
import numpy as np
import pytest

from configs import mae as mae_config
from configs.eval import analysis as analysis_config
from configs.eval import finetune as finetune_config
from configs.eval import knn as knn_config
from configs.eval import linear as linear_config
from mimjax import checkpoint
from mimjax import main
from mimjax.train import trainer


def _small(config, **kw):
  config.unlock()
  config.update_from_flattened_dict(kw)  # keys may be dotted: 'data.name'
  return config


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('mae'))
  config = _small(mae_config.get_config('tiny'), total_steps=20, checkpoint_every=20,
                  batch_size=16, async_checkpoint=False, log_every=10,
                  **{'data.worker_count': 0})
  trainer.train_and_evaluate(config, workdir)
  return workdir


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def test_knn_and_cached_probe_write_results(pretrained, tmp_path, capsys):
  config = _small(knn_config.get_config('tiny,probe=1'), pretrained=pretrained,
                  **{'evals.linear.epochs': 5, 'evals.linear.lrs': (0.1,),
                     'evals.knn.fractions': (1.0, 0.1)})
  main.run(config, str(tmp_path / 'knn'))
  res = _results(tmp_path / 'knn')
  shown = capsys.readouterr().out  # the run ends with its results table and files
  assert re.search(rf"^knn/top1 +{res['knn/top1']:.4g}$", shown, re.M), shown
  assert f"wrote {tmp_path / 'knn' / 'results.json'}" in shown
  assert res['step'] == 20
  for key in ('knn/top1', 'knn/top5', 'knn/top1@10%', 'linear/top1', 'linear/top1@10%'):
    assert 0.0 <= res[key] <= 100.0
  assert res['knn/top1'] > 20.0 and res['linear/top1'] > 20.0  # 10 classes: chance is 10%

  # The same encoder saved as an imported model (config.json without an objective + params/)
  # gives identical kNN numbers.
  params = checkpoint.restore_params(pretrained)
  pre = checkpoint.load_config(pretrained)
  imported = str(tmp_path / 'imported')
  checkpoint.save_params(imported, type(pre)({'model': pre.model.to_dict()}),
                         {'encoder': params['encoder']})
  config = _small(knn_config.get_config('tiny'), pretrained=imported,
                  **{'evals.knn.fractions': (1.0,)})
  main.run(config, str(tmp_path / 'knn_imported'))
  assert _results(tmp_path / 'knn_imported')['knn/top1'] == pytest.approx(res['knn/top1'])


def test_linear_probe_objective_trains_head_only(pretrained, tmp_path, capsys):
  workdir = str(tmp_path / 'lin')
  config = _small(linear_config.get_config('tiny,pool=abmilp'), pretrained=pretrained,
                  total_steps=6, warmup_steps=1, batch_size=32, log_every=3,
                  checkpoint_every=6, async_checkpoint=False, **{'data.worker_count': 0})
  main.run(config, workdir)
  res = _results(workdir)
  assert res['step'] == 6 and 0.0 <= res['eval/top1'] <= 100.0
  shown = capsys.readouterr().out  # the accuracy, not only the loss, ends the run
  assert re.search(rf"^eval/top1 +{res['eval/top1']:.4g}$", shown, re.M), shown
  assert f"wrote {os.path.join(workdir, 'results.json')}" in shown
  before = checkpoint.restore_params(pretrained)['encoder']
  after = checkpoint.restore_params(workdir)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after['encoder'])):
    np.testing.assert_array_equal(x, y)  # frozen
  assert set(after['head']) == {'abmilp', 'linear'}


def test_probe_rejects_unfrozen_encoder_and_missing_pretrained(pretrained, tmp_path):
  config = _small(linear_config.get_config('tiny'), pretrained=pretrained,
                  **{'optim.frozen': ('pos_embed$',)})
  with pytest.raises(ValueError, match='config.optim.frozen'):
    main.run(config, str(tmp_path / 'bad'))
  with pytest.raises(ValueError, match='config.pretrained'):
    main.run(linear_config.get_config('tiny'), str(tmp_path / 'none'))


@pytest.mark.slow
def test_finetune_and_analysis_with_plots(pretrained, tmp_path):
  workdir = str(tmp_path / 'ft')
  config = _small(finetune_config.get_config('tiny'), pretrained=pretrained, total_steps=4,
                  warmup_steps=1, batch_size=32, log_every=2, checkpoint_every=4,
                  async_checkpoint=False, **{'finetune.ema_decay': 0.9})
  main.run(config, workdir)
  res = _results(workdir)
  assert {'eval/top1', 'eval/ema_top1'} <= set(res)
  config = _small(analysis_config.get_config('tiny'), pretrained=pretrained, plots=True,
                  **{'evals.attention.num_images': 64, 'evals.spectrum.num_images': 64,
                     'evals.gardener.num_images': 64})
  main.run(config, str(tmp_path / 'ana'))
  res = _results(tmp_path / 'ana')
  assert 0 < res['attention/aad/mean'] < 32 * np.sqrt(2)
  assert sorted(os.listdir(tmp_path / 'ana' / 'plots')) == [
      'attention_aad.png', 'attention_maps.png', 'reconstructions.png', 'spectrum.png']
