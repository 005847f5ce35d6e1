"""Shared fixtures: one embedded data dir per test session (digits + photos build in ~2 s)."""

import pytest

from mimjax.data.builders import embedded


@pytest.fixture(scope='session')
def embedded_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  embedded.build_embedded('digits', d)
  embedded.build_embedded('photos', d)
  return d
