"""Exponential moving averages of parameter trees (DINO teacher, LUT target) and schedules."""

from typing import Any

import jax
import jax.numpy as jnp


def ema_update(target: Any, online: Any, momentum) -> Any:
  """target ← m·target + (1 − m)·online, leaf by leaf (BatchNorm statistics included)."""
  return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * jax.lax.stop_gradient(o),
                      target, online)


def cosine_schedule(base: float, final: float, step, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0):
  """DINO `cosine_scheduler` per step: optional linear warm-up, then final + ½(base − final)
  (1 + cos(π·i/I)) over the remaining I steps (EMA momentum 0.996 → 1, wd 0.04 → 0.4)."""
  step = jnp.asarray(step, jnp.float32)
  warm = warmup_start + (base - warmup_start) * step / max(warmup_steps, 1)
  i = jnp.clip(step - warmup_steps, 0, max(total_steps - warmup_steps, 1))
  cos = final + 0.5 * (base - final) * (1 + jnp.cos(jnp.pi * i / max(total_steps - warmup_steps, 1)))
  return jnp.where(step < warmup_steps, warm, cos)
