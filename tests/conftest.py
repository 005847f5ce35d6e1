"""Every test process fakes 8 CPU devices so sharding code paths are exercised, and shares a
persistent XLA compilation cache (also with the subprocesses tests start) so a re-run of the
suite mostly skips compilation."""

import os
from pathlib import Path

from tests.env import xla_flags  # noqa: E402  (sets nothing itself)

os.environ.setdefault('XLA_FLAGS', xla_flags(8))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Under the repo's git-ignored build/ (override with $JAX_COMPILATION_CACHE_DIR). Entries are
# keyed by the compiled program, so stale ones are never used, only never evicted.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      str(Path(__file__).resolve().parents[1] / 'build' / 'jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')  # tiny models too
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update('jax_threefry_partitionable', True)
