"""mimjax: masked-image-modeling SSL in JAX."""

import glob
import os

_GOOGLE_PCI_VENDOR = '0x1ae0'  # TPU chips are PCI devices of Google's vendor id (as jax checks)


def _quiet_libtpu_without_tpus() -> None:
  """On a host with no TPU chip, the environment that keeps an installed libtpu quiet.

  libtpu (the [dev] extra brings it for `mimjax.plan --target tpu:...`) is started by jax on
  every host at backend start-up; with no TPU it fails (jax goes on with CPU/GPU) but first
  logs a missing accelerator type and worker hostname, and a second process loading it at the
  same time fails on its lockfile. Defaults only (a user's own setting wins), and never on a
  TPU host, where these variables describe the real slice.
  """
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return
    except OSError:
      continue
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')  # one host: this one
  os.environ.setdefault('TPU_HOST_BOUNDS', '1,1,1')            # no slice to look up
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')     # no chip to guard


_quiet_libtpu_without_tpus()
