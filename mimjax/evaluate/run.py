"""Evaluation without training: run `config.evals` once on a pretrained workdir.

    python -m mimjax.main --config configs/eval/knn.py:tiny --workdir E --config.pretrained=W

(`config.mode = 'evaluate'` selects this path in mimjax.main). The model is the pretrained
one (`W/config.json` model section, with the eval config's non-None `model.*` keys on top);
the data set is the eval config's. Writes E/config.json, E/metrics.jsonl (one record, the
pretrained checkpoint's step), E/results.json, E/analysis/<name>.json (per-layer × head arrays)
and, with `--config.plots=True`, PNG figures in E/plots/.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from mimjax import checkpoint
from mimjax import logs
from mimjax import metrics as metrics_lib
from mimjax import sharding
from mimjax.evaluate.base import make_evaluators, write_results
from mimjax.models import layout
from mimjax.objectives import pretrained


def evaluation_config(config: ml_collections.ConfigDict,
                      pretrain_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The eval config with `model` replaced by the merged pretrained model config."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.model = pretrained.merge_model_config(pretrain_config.model, config.get('model'))
  return out


def validate(config: ml_collections.ConfigDict) -> None:
  """Clear errors for the keys an evaluation-only config needs."""
  for key in ('pretrained', 'data', 'evals', 'batch_size', 'seed', 'mesh'):
    if key not in config:
      raise ValueError(f'config.{key} is missing (evaluation configs: see configs/eval/knn.py)')
  if not config.evals:
    raise ValueError('config.evals is empty: expected at least one evaluator, e.g. '
                     "{'knn': {'module': 'knn'}}")
  if not isinstance(config.batch_size, int) or config.batch_size <= 0:
    raise ValueError(f'config.batch_size={config.batch_size!r}: expected a positive integer')
  from mimjax.data import pipeline
  pipeline.validate_data_config(config.data)


def _pretrained_step(workdir: str) -> int:
  ckpts = os.path.join(workdir, 'checkpoints')
  steps = [int(n) for n in os.listdir(ckpts) if n.isdigit()] if os.path.isdir(ckpts) else []
  return max(steps, default=0)


def _jsonable(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every evaluator once on `config.pretrained`; returns the results dict."""
  jax.config.update('jax_threefry_partitionable', True)
  validate(config)
  loaded = pretrained.load_pretrained(config.pretrained, config.get('checkpoint_key', 'teacher'))
  pretrain_config, path = loaded.config, loaded.path
  logging.info('evaluating the %s weights of %s', loaded.weights, config.pretrained)
  eval_config = evaluation_config(config, pretrain_config)
  mesh = sharding.make_mesh(config.mesh)
  # The eval model may lay its blocks out otherwise (an overridden model.scan_layers).
  params = pretrained.replicate(
      layout.to_layout(loaded.params, layout.scans(eval_config.model)), mesh)
  os.makedirs(workdir, exist_ok=True)
  checkpoint.write_config(workdir, config)  # atomic; a re-run replaces it

  evaluators = make_evaluators(eval_config, pretrained.EncoderRef(path), mesh)
  results = {}
  for e in evaluators:
    logging.info('evaluating %s', e.name)
    results.update({f'{e.name}/{k}': v for k, v in e.run(params, {}).items()})
    details = getattr(e, 'details', None)
    if details:
      os.makedirs(os.path.join(workdir, 'analysis'), exist_ok=True)
      with open(os.path.join(workdir, 'analysis', f'{e.name}.json'), 'w') as f:
        json.dump(_jsonable(details), f)
  step = _pretrained_step(config.pretrained)
  writer = metrics_lib.MetricWriter(workdir)
  writer.write(step, results)
  writer.close()
  write_results(workdir, step, results)
  files = [os.path.join(workdir, 'results.json')]
  if config.get('plots'):
    files += write_plots(eval_config, pretrain_config, path, jax.device_get(params), evaluators,
                         workdir)
  if jax.process_index() == 0:
    logs.print_results(results, files, title=f'evaluation of {config.pretrained} (step {step})')
  return results


def write_plots(config: ml_collections.ConfigDict, pretrain_config: ml_collections.ConfigDict,
                path: tuple[str, ...], params: Any, evaluators: list, workdir: str) -> list[str]:
  """Attention maps and MAE reconstructions of the first test images, plus the AAD and
  spectrum figures of any attention_stats / spectrum evaluator that ran."""
  from mimjax.data import pipeline
  from mimjax.evaluate import plots
  out_dir = os.path.join(workdir, 'plots')
  n = int(config.get('plot_images', 6))
  loader = pipeline.make_loader(config.data, global_batch_size=max(n, 1), seed=config.seed,
                                split='test', train=False)
  images = next(loader)['image'][:n]
  written = []
  maps = plots.prefix_attention_maps(config.model, pretrained.subtree(params, path), images)
  written.append(plots.plot_attention_maps(images, maps,
                                           os.path.join(out_dir, 'attention_maps.png')))
  panels = plots.mae_reconstructions(pretrain_config, params, images, config.seed)
  if panels is not None:
    written.append(plots.plot_reconstructions(panels, os.path.join(out_dir, 'reconstructions.png')))
  for e in evaluators:
    details = getattr(e, 'details', None) or {}
    if 'aad' in details:
      from mimjax.models.vit import model_dims
      written.append(plots.plot_aad(np.asarray(details['aad']),
                                    os.path.join(out_dir, _plot_name(e.name, 'aad')),
                                    model_dims(config.model)['patch_size']))
    if 'log_svals' in details:
      written.append(plots.plot_spectra(np.asarray(details['log_svals']),
                                        os.path.join(out_dir, _plot_name(e.name, 'spectrum'))))
  return written


def _plot_name(evaluator: str, kind: str) -> str:
  """`<evaluator>_<kind>.png`, or `<kind>.png` when the evaluator is named after it (not
  `spectrum_spectrum.png`)."""
  return f'{kind}.png' if evaluator == kind else f'{evaluator}_{kind}.png'
