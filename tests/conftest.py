"""Every test process fakes 8 CPU devices so sharding code paths are exercised."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update('jax_threefry_partitionable', True)
