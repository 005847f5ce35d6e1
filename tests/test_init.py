"""mimjax/__init__.py: an installed libtpu stays quiet on a host with no TPU chip."""

import glob
import os

import mimjax

ENV = ('TPU_WORKER_HOSTNAMES', 'TPU_HOST_BOUNDS', 'ALLOW_MULTIPLE_LIBTPU_LOAD')


def _run(monkeypatch, tmp_path, vendor, **env):
  (tmp_path / 'vendor').write_text(vendor + '\n')
  monkeypatch.setattr(glob, 'glob', lambda pattern: [str(tmp_path / 'vendor')])
  for key in ENV:
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  mimjax._quiet_libtpu_without_tpus()
  return {key: os.environ.get(key) for key in ENV}


def test_no_tpu_host_gets_quiet_defaults_and_the_users_settings_win(monkeypatch, tmp_path):
  # an Intel PCI device only: no TPU chip
  assert _run(monkeypatch, tmp_path, '0x8086') == {
      'TPU_WORKER_HOSTNAMES': 'localhost', 'TPU_HOST_BOUNDS': '1,1,1',
      'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}
  got = _run(monkeypatch, tmp_path, '0x8086', TPU_WORKER_HOSTNAMES='h0,h1')
  assert got['TPU_WORKER_HOSTNAMES'] == 'h0,h1'


def test_tpu_host_is_left_alone(monkeypatch, tmp_path):
  # Google's PCI vendor id: these variables describe the real slice there
  assert _run(monkeypatch, tmp_path, '0x1ae0') == dict.fromkeys(ENV)
