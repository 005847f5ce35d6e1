"""The training loop shared by every objective: init/restore, jit step, log, checkpoint."""

import contextlib
import functools
import json
import os
import signal
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from mimjax import checkpoint as ckpt_lib
from mimjax import logs
from mimjax import metrics as metrics_lib
from mimjax import optim
from mimjax import sharding
from mimjax import workdir as workdir_lib
from mimjax.data import device_augment
from mimjax.data import pipeline
from mimjax.durations import resolve_steps
from mimjax.evaluate.base import make_evaluators, write_results
from mimjax.models import layout
from mimjax.models import vit as vit_lib
from mimjax.objectives import base as objectives


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss or gradient."""


def init_train_state(objective: objectives.Objective, tx: optax.GradientTransformation,
                     rng: jax.Array, example: dict) -> dict:
  """The whole train state as one pytree (what is checkpointed)."""
  init_rng, step_rng = jax.random.split(rng)
  params, state = objective.init(init_rng, example)
  return {'params': params, 'opt_state': tx.init(params), 'state': state,
          'step': jnp.zeros((), jnp.int32), 'rng': jax.random.key_data(step_rng),
          'nonfinite': jnp.zeros((), jnp.int32)}


def _split_micro(batch: dict, accum: int) -> dict:
  """(B, ...) → (accum, B/accum, ...): micro-batch j takes examples j, j+accum, ... so every
  micro-batch stays evenly spread over the devices that hold the batch."""
  def split(x):
    if x.shape[0] % accum:
      raise ValueError(f'batch {x.shape[0]} not divisible by grad_accum {accum}')
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


# Folded into the step key for the device augmentation's key: the objective keeps the step key
# itself (and micro-batch j its fold_in(·, j), j < grad_accum), so no draw is shared.
AUGMENT_PURPOSE = 0x6A75_6700


def make_train_step(objective: objectives.Objective, tx: optax.GradientTransformation,
                    lr_schedule, grad_accum: int = 1,
                    augment: Optional[Callable[[dict, jax.Array], dict]] = None):
  """Returns train_step(train_state, batch) -> (train_state, metrics); jit it with shardings.

  `augment(batch, key)`: the device augmentation of the whole (global) batch, before the loss
  and before micro-batching (mimjax.data.device_augment.for_config(config.data)); its key is
  the step's key folded with AUGMENT_PURPOSE, so a resumed run redraws the same parameters."""
  grad_fn = jax.value_and_grad(objective.loss, has_aux=True)

  def train_step(ts: dict, batch: dict):
    step = ts['step']
    rng = jax.random.fold_in(jax.random.wrap_key_data(ts['rng']), step)
    if augment is not None:
      batch = augment(batch, jax.random.fold_in(rng, AUGMENT_PURPOSE))
    params = ts['params']
    if grad_accum == 1:
      (loss, (state, metrics)), grads = grad_fn(params, ts['state'], batch, rng, step)
    else:
      def micro(carry, xs):
        grads_acc, loss_acc, state = carry
        mb, i = xs
        (l, (state, m)), g = grad_fn(params, state, mb, jax.random.fold_in(rng, i), step)
        return (jax.tree.map(jnp.add, grads_acc, g), loss_acc + l, state), m
      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, loss, state), metrics = jax.lax.scan(
          micro, (zeros, jnp.zeros((), jnp.float32), ts['state']),
          (_split_micro(batch, grad_accum), jnp.arange(grad_accum)))
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
      loss = loss / grad_accum
      metrics = jax.tree.map(lambda m: m.mean(0), metrics)
    updates, opt_state = tx.update(grads, ts['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    if objective.after_update is not None:
      state = objective.after_update(new_params, state, step)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = {'params': new_params, 'opt_state': opt_state, 'state': state}
    old = {k: ts[k] for k in new}
    # A non-finite step leaves the state untouched (optax's count included, so the lr/wd
    # schedules never lag `step`); the loop then stops without saving (`_check_step`).
    kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    out = {**kept, 'step': step + 1, 'rng': ts['rng'],
           'nonfinite': ts['nonfinite'] + (~finite).astype(jnp.int32)}
    metrics = {**metrics, 'loss': loss, 'lr': lr_schedule(step), 'grad_norm': grad_norm,
               'param_norm': optax.tree.norm(kept['params'])}
    return out, metrics

  return train_step


class _Preemption:
  """SIGTERM (TPU/SLURM preemption) or Ctrl-C → save a checkpoint after the current step and
  exit cleanly. A second Ctrl-C interrupts at once (nothing more is saved)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = None
    self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum, frame):
    del frame
    if self.requested is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return bool(self.requested) or multihost_utils.reached_preemption_sync_point(step)
    return bool(self.requested)

  def restore(self):
    for s, old in self._old.items():
      signal.signal(s, old)


def _host_example(batch: dict) -> dict:
  return jax.tree.map(lambda x: np.asarray(x[:1]), batch)


class BuiltStep(NamedTuple):
  """What `build_step` returns: the jitted step and everything it was built from."""
  step_fn: Any            # jitted (train_state, batch) -> (train_state, metrics), donates state
  init_fn: Callable       # rng -> train state (jit it with out_shardings=state_shardings)
  rng: jax.Array          # the init key (config.seed)
  abstract: Any           # train state as ShapeDtypeStructs carrying their shardings
  state_shardings: Any
  total_steps: int
  lr_schedule: Callable    # step -> learning rate (for messages)


def build_step(config: ml_collections.ConfigDict, objective: objectives.Objective, mesh,
               example: dict, num_train: int) -> BuiltStep:
  """The trainer's exact train step for `config` on `mesh`: optimizer, state shardings and the
  jitted step (also what `mimjax.plan` and tests/test_scale.py compile ahead of time).
  `example` is a host batch of one (only shapes matter); `num_train` sizes the schedules."""
  total_steps = resolve_steps('total', config, num_train)
  warmup_steps = resolve_steps('warmup', config, num_train, default=0)
  rng = jax.random.key(config.seed)
  example = device_augment.objective_example(config.data, example)  # crop_on='device'
  params_shape = jax.eval_shape(lambda r: objective.init(r, example)[0], rng)
  tx, lr_schedule = optim.make_optimizer(config.optim, params_shape, total_steps=total_steps,
                                         warmup_steps=warmup_steps,
                                         batch_size=config.batch_size,
                                         num_examples=num_train)
  init_fn = sharding.traced_on(mesh, lambda r: init_train_state(objective, tx, r, example))
  abstract = jax.eval_shape(init_fn, rng)
  state_shardings = sharding.tree_shardings(mesh, abstract, config.get('fsdp_min_size', 2 ** 16))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_shardings)
  train_step = make_train_step(objective, tx, lr_schedule, int(config.get('grad_accum', 1)),
                               device_augment.for_config(config.data))
  step_fn = sharding.jit_on(mesh, train_step,
                            in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                            out_shardings=(state_shardings, sharding.replicated(mesh)),
                            donate_argnums=(0,))
  return BuiltStep(step_fn, init_fn, rng, abstract, state_shardings, total_steps, lr_schedule)


def whole_step_flops(config: ml_collections.ConfigDict, example: dict,
                     num_train: int) -> Optional[float]:
  """FLOPs of the whole train step (every device's share: the global batch) with the block
  stacks unrolled, from XLA's cost analysis of its lowering on one CPU device (no compile);
  None where the layers are not scanned (the compiled program's own figure is right there).

  XLA's cost analysis counts a while loop's body once, not once per trip: a scanned step's own
  figure counts each `nn.scan` stack as one block (tiny MAE: 59.1 vs 81.7 MFLOP). So every
  FLOPs figure of a scanned row (plan, bench, MFU) comes from here."""
  if not layout.scans(config.model):
    return None
  unrolled = ml_collections.ConfigDict(config.to_dict())
  unrolled.model.scan_layers = False
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'devices': 1}), jax.devices('cpu')[:1])
  built = build_step(unrolled, objectives.load(unrolled.objective).make(unrolled), mesh,
                     example, num_train)
  batch = sharding.abstract_batch(example, config.batch_size, mesh)
  cost = built.step_fn.lower(built.abstract, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       objective: Optional[objectives.Objective] = None, *,
                       allow_config_change: bool = False) -> dict:
  """Trains `config` in `workdir`, resuming from its latest intact checkpoint; returns the last
  metrics. Resuming with a config that differs beyond `workdir.RESUMABLE_KEYS` is refused
  unless `allow_config_change`."""
  jax.config.update('jax_threefry_partitionable', True)  # RNG independent of device layout
  if '://' not in workdir:
    workdir = os.path.abspath(workdir)  # orbax wants absolute paths
    workdir_lib.check_output_dir(workdir)
    workdir_lib.check_writable(workdir)
  objective = objective or objectives.load(config.objective).make(config)
  mesh = sharding.make_mesh(config.mesh)
  num_train = pipeline.num_examples(config.data, 'train')
  loader = pipeline.make_loader(config.data, global_batch_size=config.batch_size,
                                seed=config.seed, split='train', train=True)
  initial_data_state = loader.get_state()
  example = _host_example(next(loader))

  built = build_step(config, objective, mesh, example, num_train)
  total_steps, init_fn, rng = built.total_steps, built.init_fn, built.rng
  abstract, state_shardings, step_fn = built.abstract, built.state_shardings, built.step_fn
  lr_schedule = built.lr_schedule

  init_params = None
  if config.get('init_from') and not _has_checkpoints(workdir):
    # Read before anything is created: a bad init_from leaves no half-made workdir behind.
    init_params = _load_init_from(config)

  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  with contextlib.ExitStack() as cleanup:  # closed in reverse order, on errors too
    if jax.process_index() == 0:  # hosts of one job share the workdir: process 0 locks it
      cleanup.enter_context(workdir_lib.WorkdirLock(workdir))
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.get('keep_checkpoints', 2),
                                 async_save=config.get('async_checkpoint', True))
    cleanup.callback(ckpt.close)
    changes, old_total = {}, None
    if ckpt.latest_step() is not None:
      changes, old_total = _resume_config_check(config, workdir, allow_config_change, num_train)
    restored = ckpt.restore_latest(abstract)
    writer = metrics_lib.MetricWriter(workdir)
    cleanup.callback(writer.close)
    if restored is not None:
      start, ts, data_state = restored
      loader.set_state(data_state)  # process 0's state; valid on every host
      writer.truncate_after(start)
      logs.say(f'resuming from step {start} of {total_steps} in {workdir}')
      if jax.process_index() == 0:
        if changes:
          ckpt_lib.write_config(workdir, config)
        workdir_lib.append_history(workdir, 'resume', step=start, total_steps=total_steps,
                                   changes=changes, allow_config_change=allow_config_change)
      if old_total is not None and old_total != total_steps:
        logs.say(f'{"extending" if total_steps > old_total else "shortening"} the run from '
             f'{old_total} to {total_steps} steps: the learning-rate schedule is recomputed for '
             f'{total_steps} steps, so step {start} continues at lr {float(lr_schedule(start)):.3g}'
             ' (recorded in config.json and history.jsonl)')
      if set(changes) - set(workdir_lib.DURATION_KEYS):
        logs.say(f'config changes on resume (recorded in config.json and history.jsonl): '
             f'{workdir_lib.describe_changes(changes)}')
    else:
      start = 0
      # A run killed before its first checkpoint may have logged steps: they are redone.
      writer.truncate_after(0)
      loader.set_state(initial_data_state)
      ts = jax.jit(init_fn, out_shardings=state_shardings)(rng)
      if config.get('init_from'):
        if init_params is None:  # checkpoints were there at start-up but none was intact
          init_params = _load_init_from(config)
        ts = _init_from(ts, init_params, config.init_from, objective)
      if jax.process_index() == 0:  # one writer: hosts share the workdir
        ckpt_lib.write_config(workdir, config)
        workdir_lib.append_history(workdir, 'start', step=0, total_steps=total_steps)
      logs.say(f'training {_method_name(config)} for {total_steps} steps on {jax.device_count()} '
           f'device(s), batch {config.batch_size}, in {workdir}')

    evaluators = make_evaluators(config, objective, mesh)
    preemption = _Preemption()
    cleanup.callback(preemption.restore)
    # A bar on a terminal; in a log file a line every log_every steps or 30 s (logs.Progress).
    bar = logs.Progress(total_steps, start, per_unit=config.batch_size, every=config.log_every,
                        enabled=jax.process_index() == 0)
    cleanup.callback(bar.close)
    record, step, uniform_logs, final_results = {}, start, 0, {}
    last_good = start if ckpt.latest_step() is not None else None
    check = functools.partial(_check_step, writer=writer, workdir=workdir, start=start,
                              restored=None if restored is None else ckpt.restored_verified)
    t0, images_seen, previous = time.perf_counter(), 0, None
    while step < total_steps:
      batch = sharding.put_batch(next(loader), mesh)
      ts, metrics = step_fn(ts, batch)
      step += 1
      if previous is not None:  # one step late, so the device always has a step queued
        check(*previous, last_good=last_good, logged=record)
      previous = (step, metrics)
      images_seen += config.batch_size
      bar.update(1)
      is_last = step == total_steps
      stop = preemption.should_stop(step)
      if step % config.log_every == 0 or is_last or stop:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - t0
        record = writer.write(step, {**metrics, 'img_per_s': images_seen / elapsed})
        loss = record['loss']  # a str ('nan') when not finite
        bar.set_postfix(loss=loss if isinstance(loss, str) else f'{loss:.4g}')
        uniform_logs = _warn_uniform(record, uniform_logs)
        t0, images_seen = time.perf_counter(), 0
      # Save before evaluating: an evaluator that fails must not cost this step's checkpoint.
      if step % config.checkpoint_every == 0 or is_last or stop:
        check(step, metrics, last_good=last_good, logged=record)
        previous = None
        ckpt.save(step, ts, loader.get_state(), config, force=True)
        last_good = step
      due = [e for e in evaluators if is_last or step % e.every_steps == 0]
      if due and not stop:
        results = {}
        for e in due:
          results.update({f'{e.name}/{k}': v for k, v in e.run(ts['params'], ts['state']).items()})
        record.update(writer.write(step, results))
        if is_last:
          write_results(workdir, step, results)
          final_results = results
      if stop:
        logs.say(f'{preemption.requested or "preemption"} received: saved step {step}, exiting '
             '(re-run the same command to resume)')
        break
    bar.close()  # the lines below start on a fresh line, not on the bar's
    if step == start:
      logs.say(f'nothing to do: {workdir} is already at step {step} of {total_steps}')
    elif step == total_steps:
      logs.say(f'done: step {step}, loss {record.get("loss")}; checkpoints in {workdir}/checkpoints')
    if final_results and jax.process_index() == 0:
      logs.print_results(final_results, [os.path.join(workdir, 'results.json')],
                         title=f'evaluation at step {step}')
    return record


def _resume_config_check(config: ml_collections.ConfigDict, workdir: str,
                         allow_config_change: bool, num_train: int) -> tuple[dict, Any]:
  """(changes from W/config.json to `config`, the old total steps); refuses changes that
  would mix two runs in one workdir."""
  old = ckpt_lib.read_config_json(workdir)  # a damaged one comes back from a checkpoint
  if old is None:
    return {}, None
  changes = workdir_lib.config_changes(_effective_dims(old),
                                       _effective_dims(json.loads(ckpt_lib.config_to_json(config))))
  refused = workdir_lib.refused_changes(changes)
  if refused and not allow_config_change:
    listed = workdir_lib.describe_changes(refused)
    raise ValueError(f'{workdir} was trained with another config ({listed}); '
                     f'{workdir_lib.OVERRIDE_HINT}')
  return changes, resolve_steps('total', ml_collections.ConfigDict(old), num_train)


def _effective_dims(config: dict) -> dict:
  """`config` with the model sizes left at None (the variant's) replaced by their values, so
  a resume refusal says `model.num_heads: 4 → 2`, not `None → 2`."""
  model = config.get('model')
  if not isinstance(model, dict) or not model.get('variant'):
    return config
  dims = vit_lib.model_dims(ml_collections.ConfigDict(model))
  return {**config, 'model': {**model, **{k: v for k, v in dims.items()
                                          if k in model and model[k] is None}}}


def _warn_uniform(record: dict, count: int) -> int:
  """One warning line once an objective's `output_uniformity` (DINO: student entropy / ln K)
  stayed above 0.99 for two logged steps in a row: the output has collapsed to uniform."""
  value = record.get('output_uniformity')
  count = count + 1 if isinstance(value, float) and value > 0.99 else 0
  if count == 2:
    logs.say(f'warning: step {record.get("step")}: the student output is uniform (entropy '
         f'{value:.3f}·ln K): training has collapsed (docs/dino.md)')
  return count


def _method_name(config: ml_collections.ConfigDict) -> str:
  """The method a config trains: the MaskFeat/BEiT baselines run the semantic_mim objective
  without proxies, MRE-MAE/MRE-DINO the mae/dino objective with the segment bias on; each is
  announced by its own name."""
  if config.objective == 'semantic_mim' and not config.model.get('proxy', True):
    return {'hog': 'maskfeat', 'tokens': 'beit'}.get(config.get('target'), config.objective)
  if config.objective in ('mae', 'dino') and \
      (config.model.get('segment_bias') or {}).get('enabled'):
    return f'mre_{config.objective}'
  return config.objective


def _check_step(step: int, metrics: dict, *, writer: metrics_lib.MetricWriter, workdir: str,
                start: int, restored: Optional[bool], last_good: Optional[int],
                logged: dict) -> None:
  """Stops at the first step whose loss or gradient is NaN/Inf, as the MAE and DINO reference
  code does (`sys.exit(1)`): its update was not applied and nothing after it is saved, so the
  optimizer count, lr/wd schedules, EMA momentum and teacher temperature all stay on `step`.
  The step's metrics are logged first. `restored`: None for a fresh run, else whether the
  checkpoint resumed from matched its digests (the first step after it failing blames it)."""
  loss, grad_norm = (float(x) for x in jax.device_get((metrics['loss'], metrics['grad_norm'])))
  if np.isfinite(loss) and np.isfinite(grad_norm):
    return
  if logged.get('step') != step:
    writer.write(step, metrics)
  checkpoints = os.path.join(workdir, 'checkpoints')
  if restored is not None and step == start + 1:
    how = ('its files match the digests written when it was saved, so suspect a config change '
           'or the data' if restored else 'it has no digests to check it against')
    raise NonFiniteLossError(
        f'the first step after resuming from {checkpoints}/{start} had a NaN/Inf loss or '
        f'gradient: that checkpoint is suspect ({how}); to resume from the one before it, '
        f'move it aside: mv {checkpoints}/{start} {workdir}/checkpoints.corrupt/{start}')
  where = (f'the last good checkpoint (step {last_good}) in {checkpoints} is intact'
           if last_good is not None else 'no checkpoint was written')
  raise NonFiniteLossError(
      f'step {step} had a NaN/Inf loss or gradient (loss {loss}, grad_norm {grad_norm}; the '
      f'update was not applied); stopping: {where}. Lower the learning rate, use float32, or '
      'check the data.')


def _has_checkpoints(workdir: str) -> bool:
  ckpts = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))


def _load_init_from(config: ml_collections.ConfigDict) -> Any:
  """The encoder params of `config.init_from` (a DINO workdir gives its EMA teacher unless
  `config.checkpoint_key='student'`)."""
  from mimjax.objectives import pretrained  # evaluation helpers; only needed here
  return pretrained.load_pretrained(config.init_from,
                                  config.get('checkpoint_key', 'teacher')).encoder


def _init_from(ts: dict, loaded: Any, source: str, objective: objectives.Objective) -> dict:
  """Replaces the encoder params by `loaded`, the encoder params of workdir or converted model
  `source` (`config.init_from`), converted to this run's block layout."""
  parent = ts['params']
  for key in objective.encoder[:-1]:
    parent = parent[key]
  current = parent[objective.encoder[-1]]
  # Either block layout loads into either (model.scan_layers of the source and of this run).
  loaded = layout.to_layout(loaded, layout.is_scanned(current))
  want = jax.tree.map(lambda x: tuple(x.shape), current)
  got = jax.tree.map(lambda x: tuple(np.shape(x)), loaded)
  if want != got:
    raise ValueError(f'config.init_from={source!r}: encoder params do not match this model;\n'
                     f'expected {want}\ngot {got}')
  parent[objective.encoder[-1]] = jax.tree.map(
      lambda c, l: jax.device_put(np.asarray(l, c.dtype), c.sharding), current, loaded)
  return ts
