"""The XLA set-up every test process and every subprocess a test starts runs with."""

import os

# Tests compile hundreds of tiny programs and run each for a few steps: LLVM's optimisation
# passes are most of a CPU compile (tiny MAE step: 19.8 s → 10.2 s under load at level 0)
# while the tiny programs barely notice slower code. HLO (hence FLOPs, shardings,
# collectives and the numbers) is unchanged; only the machine-code optimisation level drops.
# The legacy (non-MLIR) fusion emitters compile a tiny step ~35 % faster again (tiny MAE
# train step on 8 devices: 4.2–5.5 s → 2.6–3.5 s; tiny DINO 6.6–8.4 → 3.9–6.1 s).
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'


def xla_flags(devices: int = 8) -> str:
  """XLA_FLAGS for a CPU process with `devices` fake devices, compiled for test speed."""
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}'


def subprocess_env(devices: int = 8, **extra: str) -> dict:
  """os.environ for a subprocess test: CPU, `devices` fake devices, fast compiles, `extra`."""
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(devices), **extra)
