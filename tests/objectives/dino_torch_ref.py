"""An independent PyTorch transcription of facebookresearch/dino's training loop for a tiny ViT.

Written from the official main_dino.py (DINOLoss, train_one_epoch, get_params_groups,
cosine_scheduler), utils.py (clip_gradients, cancel_gradients_last_layer, MultiCropWrapper) and
vision_transformer.py (VisionTransformer with interpolate_pos_encoding, Block, Attention,
DINOHead), single process. It starts from given parameters (mimjax's initial ones, copied in by
`load_mimjax_params`) so a run can be compared step by step with mimjax's; drop path is left
out (it is random, so the two could not see the same sample masks).
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)


# ----------------------------------------------------------------------------------- model
class Attention(nn.Module):
  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
  def __init__(self, dim, num_heads, mlp_dim):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
  """DINO's ViT: cls token after the final norm; pos-embed resized per input size."""

  def __init__(self, img_size, patch_size, dim, depth, num_heads, mlp_dim):
    super().__init__()
    self.patch_size = patch_size
    self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, dim))
    self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_dim) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def interpolate_pos_encoding(self, x, w, h):
    npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
    if npatch == n and w == h:
      return self.pos_embed
    class_pos, patch_pos = self.pos_embed[:, 0], self.pos_embed[:, 1:]
    dim = x.shape[-1]
    w0, h0 = w // self.patch_size + 0.1, h // self.patch_size + 0.1
    patch_pos = F.interpolate(
        patch_pos.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode='bicubic')
    patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos.unsqueeze(0), patch_pos), dim=1)

  def forward(self, x):
    b, _, w, h = x.shape
    x = self.patch_embed(x).flatten(2).transpose(1, 2)
    x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
    x = x + self.interpolate_pos_encoding(x, w, h)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)[:, 0]


class DINOHead(nn.Module):
  def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3,
               hidden_dim=2048, bottleneck_dim=256):
    super().__init__()
    layers = [nn.Linear(in_dim, hidden_dim)]
    if use_bn:
      layers.append(nn.BatchNorm1d(hidden_dim))
    layers.append(nn.GELU())
    for _ in range(nlayers - 2):
      layers.append(nn.Linear(hidden_dim, hidden_dim))
      if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
      layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    self.mlp = nn.Sequential(*layers)
    self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    self.last_layer.weight_g.data.fill_(1)
    if norm_last_layer:
      self.last_layer.weight_g.requires_grad = False

  def forward(self, x):
    return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
  """utils.MultiCropWrapper: one backbone pass per run of equal-resolution crops."""

  def __init__(self, backbone, head):
    super().__init__()
    self.backbone, self.head = backbone, head

  def forward(self, x):
    idx_crops = torch.cumsum(torch.unique_consecutive(
        torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0)
    start, output = 0, torch.empty(0)
    for end in idx_crops:
      output = torch.cat((output, self.backbone(torch.cat(x[start:end]))))
      start = end
    return self.head(output)


def load_mimjax_params(model: MultiCropWrapper, params, batch_stats=None) -> None:
  """Copies a mimjax DINOModel param tree (numpy leaves) into `model` (Flax (in, out) kernels
  → torch (out, in); the HWIO patch conv → OIHW), and with a BatchNorm head (`mlp_{i}` holding
  scale/bias) the head's `batch_stats` (mean/var → running_mean/var)."""
  t = lambda x: torch.from_numpy(np.array(x, np.float32))
  enc, head = params['encoder'], params['head']
  sd = {'backbone.patch_embed.weight': t(enc['patch_embed']['proj']['kernel']).permute(3, 2, 0, 1),
        'backbone.patch_embed.bias': t(enc['patch_embed']['proj']['bias']),
        'backbone.cls_token': t(enc['cls_token']), 'backbone.pos_embed': t(enc['pos_embed']),
        'backbone.norm.weight': t(enc['norm']['scale']), 'backbone.norm.bias': t(enc['norm']['bias'])}
  i = 0
  while f'blocks_{i}' in enc:
    blk, pre = enc[f'blocks_{i}'], f'backbone.blocks.{i}.'
    for ours, theirs in (('attn/qkv', 'attn.qkv'), ('attn/proj', 'attn.proj'),
                         ('mlp/fc1', 'mlp.0'), ('mlp/fc2', 'mlp.2')):
      a, b = ours.split('/')
      sd[pre + theirs + '.weight'] = t(blk[a][b]['kernel']).T
      sd[pre + theirs + '.bias'] = t(blk[a][b]['bias'])
    for n in ('norm1', 'norm2'):
      sd[pre + n + '.weight'], sd[pre + n + '.bias'] = t(blk[n]['scale']), t(blk[n]['bias'])
    i += 1
  stats = (batch_stats or {}).get('head', {})
  for name, layer in head.items():
    if name.startswith('mlp_'):
      j = name.split('_')[1]
      if 'scale' in layer:   # BatchNorm1d
        sd[f'head.mlp.{j}.weight'], sd[f'head.mlp.{j}.bias'] = t(layer['scale']), t(layer['bias'])
        sd[f'head.mlp.{j}.running_mean'] = t(stats[name]['mean'])
        sd[f'head.mlp.{j}.running_var'] = t(stats[name]['var'])
        sd[f'head.mlp.{j}.num_batches_tracked'] = torch.tensor(0)
      else:
        sd[f'head.mlp.{j}.weight'] = t(layer['kernel']).T
        sd[f'head.mlp.{j}.bias'] = t(layer['bias'])
  sd['head.last_layer.weight_v'] = t(head['last_layer_weight_v']).T
  sd['head.last_layer.weight_g'] = (t(head['last_layer_weight_g']).T if 'last_layer_weight_g'
                                    in head else torch.ones(sd['head.last_layer.weight_v'].shape[0], 1))
  missing, unexpected = model.load_state_dict(sd, strict=True)
  assert not missing and not unexpected


# ------------------------------------------------------------------------------------ loss
class DINOLoss(nn.Module):
  """main_dino.py DINOLoss, single process (all_reduce of the batch center is the identity)."""

  def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
               warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):
    super().__init__()
    self.student_temp = student_temp
    self.center_momentum = center_momentum
    self.ncrops = ncrops
    self.register_buffer('center', torch.zeros(1, out_dim))
    self.teacher_temp_schedule = np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

  def forward(self, student_output, teacher_output, epoch):
    student_out = (student_output / self.student_temp).chunk(self.ncrops)
    temp = self.teacher_temp_schedule[epoch]
    teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
      for v in range(len(student_out)):
        if v == iq:
          continue
        total_loss += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
        n_loss_terms += 1
    total_loss /= n_loss_terms
    self.update_center(teacher_output)
    return total_loss

  @torch.no_grad()
  def update_center(self, teacher_output):
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


# ------------------------------------------------------------------------------- training
def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0):
  """utils.cosine_scheduler (per iteration)."""
  warmup_schedule = np.array([])
  warmup_iters = warmup_epochs * niter_per_ep
  if warmup_epochs > 0:
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
  iters = np.arange(epochs * niter_per_ep - warmup_iters)
  schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate((warmup_schedule, schedule))


def clip_gradients(model, clip):
  for p in model.parameters():
    if p.grad is not None:
      clip_coef = clip / (p.grad.data.norm(2) + 1e-6)
      if clip_coef < 1:
        p.grad.data.mul_(clip_coef)


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
  if epoch >= freeze_last_layer:
    return
  for n, p in model.named_parameters():
    if 'last_layer' in n:
      p.grad = None


def get_params_groups(model):
  regularized, not_regularized = [], []
  for name, param in model.named_parameters():
    if not param.requires_grad:
      continue
    if name.endswith('.bias') or len(param.shape) == 1:
      not_regularized.append(param)
    else:
      regularized.append(param)
  return [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]


def to_crops(batch: dict) -> list:
  """A mimjax 'dino' batch (uint8 (B, n, H, W, 3)) → DINO's crop list of normalised NCHW."""
  crops = []
  for key in ('global', 'local'):
    x = (np.asarray(batch[key], np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    crops += [torch.from_numpy(np.ascontiguousarray(x[:, c].transpose(0, 3, 1, 2)))
              for c in range(x.shape[1])]
  return crops


def entropy(p):
  return -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()


def head_batch_stats(model: MultiCropWrapper) -> dict:
  """The head's BatchNorm running statistics as a mimjax `batch_stats` tree (numpy)."""
  return {'head': {f'mlp_{i}': {'mean': m.running_mean.numpy().copy(),
                                'var': m.running_var.numpy().copy()}
                   for i, m in enumerate(model.head.mlp) if isinstance(m, nn.BatchNorm1d)}}


def train(params, batches, *, model_dims: dict, head: dict, lr, min_lr, weight_decay,
          weight_decay_end, momentum_teacher, clip_grad, freeze_last_layer_steps,
          warmup_steps, total_steps, steps_per_epoch, student_temp, teacher_temp,
          warmup_teacher_temp, warmup_teacher_temp_epochs, center_momentum, img_size,
          batch_stats=None, log=None, final=None) -> list:
  """main_dino.py's loop on `batches` (mimjax 'dino' batches), one step per batch, from the
  mimjax params `params` (and head `batch_stats` with `head['use_bn']`); returns per-step
  dicts (loss, teacher/student entropy). `final`, a dict, receives the trained student and
  teacher."""
  torch.manual_seed(0)
  torch.set_num_threads(1)   # tiny tensors: threads only contend
  make = lambda: MultiCropWrapper(
      VisionTransformer(img_size, model_dims['patch_size'], model_dims['width'],
                        model_dims['depth'], model_dims['num_heads'], model_dims['mlp_dim']),
      DINOHead(model_dims['width'], head['out_dim'], head.get('use_bn', False),
               head['norm_last_layer'], head['nlayers'], head['hidden_dim'],
               head['bottleneck_dim']))
  student, teacher = make(), make()
  load_mimjax_params(student, params, batch_stats)
  # Both stay in train mode (main_dino.py never calls .eval()): BatchNorm uses batch statistics.
  teacher.load_state_dict(student.state_dict())
  for p in teacher.parameters():
    p.requires_grad = False
  n_local = None
  epochs = math.ceil(total_steps / steps_per_epoch)
  # The official schedules are per epoch × iterations; index them by step (the run may end
  # mid-epoch as mimjax's step-based runs do): warm-up and cosine over `total_steps`.
  lr_schedule = cosine_scheduler(lr, min_lr, total_steps, 1, warmup_epochs=warmup_steps)
  wd_schedule = cosine_scheduler(weight_decay, weight_decay_end, total_steps, 1)
  momentum_schedule = cosine_scheduler(momentum_teacher, 1, total_steps, 1)
  optimizer = torch.optim.AdamW(get_params_groups(student))
  out = []
  for it, batch in enumerate(batches):
    epoch = it // steps_per_epoch
    crops = to_crops(batch)
    if n_local is None:
      n_local = len(crops) - 2
      loss_fn = DINOLoss(head['out_dim'], 2 + n_local, warmup_teacher_temp, teacher_temp,
                         warmup_teacher_temp_epochs, max(epochs, warmup_teacher_temp_epochs),
                         student_temp, center_momentum)
    for i, group in enumerate(optimizer.param_groups):
      group['lr'] = lr_schedule[it]
      if i == 0:
        group['weight_decay'] = wd_schedule[it]
    teacher_output = teacher(crops[:2])
    student_output = student(crops)
    temp = loss_fn.teacher_temp_schedule[epoch]
    with torch.no_grad():
      q = F.softmax((teacher_output - loss_fn.center) / temp, dim=-1)
      p = F.softmax(student_output / student_temp, dim=-1)
      row = {'teacher_entropy': float(entropy(q)), 'student_entropy': float(entropy(p))}
    loss = loss_fn(student_output, teacher_output, epoch)
    optimizer.zero_grad()
    loss.backward()
    clip_gradients(student, clip_grad)
    # cancel_gradients_last_layer, with the frozen span in steps
    cancel_gradients_last_layer(0 if it < freeze_last_layer_steps else 1, student, 1)
    optimizer.step()
    with torch.no_grad():
      m = momentum_schedule[it]
      for param_q, param_k in zip(student.parameters(), teacher.parameters()):
        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
    row['loss'] = float(loss.detach())
    out.append(row)
    if log is not None:
      log(it, row)
  if final is not None:
    final.update(student=student, teacher=teacher)
  return out


# ------------------------------------------------------------------------ side by side
def run_mimjax(config, steps: int, log=print, final=None):
  """`steps` steps of mimjax's jitted train step on `config` (drop path forced to 0);
  returns (config as run, (initial params, initial head batch_stats or None), the batches,
  per-step metric rows); `final`, a dict, receives the final train state."""
  import jax
  from mimjax.data import pipeline
  from mimjax.objectives import dino
  from mimjax import optim
  from mimjax.train import trainer
  from mimjax.durations import resolve_steps

  config = config.copy_and_resolve_references()
  config.model.drop_path = 0.0
  config.data.worker_count = 0
  num_train = pipeline.num_examples(config.data, 'train')
  total = resolve_steps('total', config, num_train)
  warmup = resolve_steps('warmup', config, num_train, default=0)
  objective = dino.make(config)
  loader = pipeline.make_loader(config.data, global_batch_size=config.batch_size,
                                seed=config.seed, split='train', train=True)
  batches = [next(loader) for _ in range(steps)]
  example = {k: v[:1] for k, v in batches[0].items()}
  key = jax.random.key(config.seed)
  shapes = jax.eval_shape(lambda r: objective.init(r, example)[0], key)
  tx, lr = optim.make_optimizer(config.optim, shapes, total_steps=total, warmup_steps=warmup,
                                batch_size=config.batch_size, num_examples=num_train)
  ts = trainer.init_train_state(objective, tx, key, example)
  params0 = jax.device_get(ts['params'])
  stats0 = jax.device_get(ts['state'].get('batch_stats', {}).get('student'))
  step_fn = jax.jit(trainer.make_train_step(objective, tx, lr))
  rows = []
  for it, batch in enumerate(batches):
    ts, m = step_fn(ts, batch)
    rows.append({k: float(v) for k, v in jax.device_get(m).items()})
    if log and (it % 20 == 0 or it == steps - 1):
      log(f'mimjax {it:4d} loss {rows[-1]["loss"]:.4f} H_t {rows[-1]["teacher_entropy"]:.3f} '
          f'H_s {rows[-1]["student_entropy"]:.3f}')
  if final is not None:
    final.update(jax.device_get(ts))
  return config, (params0, stats0), batches, rows


def run_side_by_side(config, steps: int, log=print, final=None) -> tuple[list, list]:
  """Trains `config` (a DINO config, drop path forced to 0) for `steps` steps with mimjax's
  train step and with this reference, same initial params, same batches, same schedules;
  returns (mimjax rows, torch rows) of per-step metrics. `final`, a dict, receives both
  runs' end states ('mimjax': train state; 'student', 'teacher': torch modules)."""
  from mimjax.data import pipeline
  from mimjax.models.vit import model_dims as dims_of
  from mimjax import optim
  from mimjax.durations import resolve_steps

  mimjax_final = {} if final is not None else None
  config, (params0, stats0), batches, ours = run_mimjax(config, steps, log, mimjax_final)
  if final is not None:
    final['mimjax'] = mimjax_final
  num_train = pipeline.num_examples(config.data, 'train')
  total = resolve_steps('total', config, num_train)
  warmup = resolve_steps('warmup', config, num_train, default=0)
  o, d = config.optim, config.dino
  theirs = train(
      params0, batches, model_dims={**dims_of(config.model)}, head=dict(d.head),
      lr=optim.peak_lr(o, config.batch_size), min_lr=o.min_lr, weight_decay=o.weight_decay,
      weight_decay_end=o.weight_decay_end, momentum_teacher=d.momentum_teacher,
      clip_grad=o.clip_per_tensor,
      freeze_last_layer_steps=optim.freeze_steps(o, num_train, config.batch_size),
      warmup_steps=warmup, total_steps=total, steps_per_epoch=num_train // config.batch_size,
      student_temp=d.student_temp, teacher_temp=d.teacher_temp,
      warmup_teacher_temp=d.warmup_teacher_temp,
      warmup_teacher_temp_epochs=d.warmup_teacher_temp_epochs,
      center_momentum=d.center_momentum, img_size=config.model.image_size,
      batch_stats=stats0, final=final,
      log=(lambda it, r: log(f'torch  {it:4d} loss {r["loss"]:.4f} H_t '
                             f'{r["teacher_entropy"]:.3f} H_s {r["student_entropy"]:.3f}')
           if it % 20 == 0 or it == steps - 1 else None) if log else None)
  return ours, theirs


def main(argv=None) -> None:
  """python tests/objectives/dino_torch_ref.py [--config configs/dino.py:tiny] [--steps N]
  [--total_steps T]: mimjax vs this reference, loss every 20 steps."""
  import argparse
  import importlib.util
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('--config', default='configs/dino.py:tiny')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--total_steps', type=int, default=400)
  parser.add_argument('--set', nargs='*', default=[], help='dotted.key=python_literal overrides')
  args = parser.parse_args(argv)
  path, _, arg = args.config.partition(':')
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.total_steps = args.total_steps
  import ast
  for item in args.set:
    key, _, value = item.partition('=')
    target, parts = config, key.split('.')
    for p in parts[:-1]:
      target = target[p]
    target[parts[-1]] = ast.literal_eval(value)
  import time
  start = time.time()
  ours, theirs = run_side_by_side(config, args.steps)
  print(f'wall {time.time() - start:.0f} s')
  print('| step | ' + ' | '.join(f'{name} mimjax | {name} torch | {name} abs diff'
                                  for name in ('loss', 'H(teacher)', 'H(student)')) + ' |')
  for it in sorted(set(range(0, args.steps, 20)) | {args.steps - 1}):
    cells = []
    for key in ('loss', 'teacher_entropy', 'student_entropy'):
      a, b = ours[it][key], theirs[it][key]
      cells += [f'{a:.4f}', f'{b:.4f}', f'{abs(a - b):.1e}']
    print(f'| {it} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
