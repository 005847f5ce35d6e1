"""mimjax.main: one-line errors, configs found from any directory, evaluation re-runs, the
persistent compilation cache setting."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from mimjax import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO, MIMJAX_COMPILATION_CACHE='off')
  return subprocess.run([sys.executable, '-m', 'mimjax.main', *args], cwd=cwd, env=env,
                        capture_output=True, text=True)


@pytest.mark.parametrize('args,message', [
    (['--config.bogus=1'], '--config.bogus: no such config key'),
    (['--config.total_step=10'],
     '--config.total_step: no such config key; did you mean total_steps?'),
    (['--config.model.widht=8'], '--config.model.widht: no such config key; did you mean width?'),
    (['--config.batch_size=abc'], "--config.batch_size=abc: invalid literal for int()"),
    (['--config.optim.lr=nan'], 'config.optim.lr=nan: expected a finite number'),  # issue 28.4
])
def test_bad_override_is_one_line(tmp_path, args, message):
  out = _main('--config', 'configs/mae.py:tiny', '--workdir', str(tmp_path / 'w'), *args)
  assert out.returncode == 2
  assert out.stderr.startswith('mimjax: error: ')
  assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr
  assert not (tmp_path / 'w').exists()


def test_missing_config_file_and_bad_config_arg_are_one_line(tmp_path):
  out = _main('--config', 'configs/nope.py:tiny', '--workdir', str(tmp_path / 'w'))
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
  assert out.stderr.startswith('mimjax: error: --config configs/nope.py: no such file')
  out = _main('--config', 'configs/mae.py:nope', '--workdir', str(tmp_path / 'w'))
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
  assert "config arg 'nope': cannot parse 'nope'" in out.stderr


def test_configs_found_from_outside_the_repository(tmp_path):
  """Relative to the repository or as an absolute path; `configs.common` imports either way.
  (A bad batch size stops it right after the config loaded, before any training.)"""
  for config in ('configs/mae.py:tiny', os.path.join(REPO, 'configs/mae.py') + ':tiny'):
    out = _main('--config', config, '--workdir', str(tmp_path / 'w'), '--config.batch_size=0',
                cwd=str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip() == 'mimjax: error: config.batch_size=0: expected a positive integer'
    assert not (tmp_path / 'w').exists()  # refused before anything is written


def test_config_without_row_names_the_paper_row_and_the_tiny_one(tmp_path):
  out = _main('--config', 'configs/mae.py', '--workdir', str(tmp_path / 'w'),
              f'--config.data.data_dir={tmp_path / "tfds"}', cwd=str(tmp_path))
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert "no prepared data set 'imagenet2012'" in out.stderr
  assert out.stderr.strip().endswith(
      '--config configs/mae.py without :ROW is its paper row configs/mae.py:vit_b,in1k,1600ep; '
      'for the laptop smoke test on the embedded data use --config configs/mae.py:tiny')
  assert not (tmp_path / 'w').exists()


def test_workdir_that_is_a_file(tmp_path):
  (tmp_path / 'f').write_text('x')
  out = _main('--config', 'configs/mae.py:tiny', '--workdir', str(tmp_path / 'f'))
  assert out.returncode == 2
  assert out.stderr.strip() == (f'mimjax: error: --workdir {tmp_path / "f"}: exists and is not '
                                'a directory; expected a directory (new or from an earlier run)')


def test_empty_workdir_is_refused(tmp_path):
  """Issue 28.3: `--workdir ""` trained into the current directory (a repository clone)."""
  out = _main('--config', os.path.join(REPO, 'configs/mae.py') + ':tiny', '--workdir', '',
              cwd=str(tmp_path))
  assert out.returncode == 2
  assert out.stderr.strip() == ('mimjax: error: --workdir is empty; expected a directory path '
                                '(new or from an earlier run), e.g. --workdir workdirs/run1')
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('key,value,expected', [
    ('optim.lr', float('nan'), 'expected a finite number'),
    ('optim.weight_decay', float('inf'), 'expected a finite number'),
    ('optim.lr', 0.0, 'expected a value in (0, inf)'),
    ('optim.b2', 1.0, 'expected a value in [0, 1)'),
    ('optim.weight_decay', -0.1, 'expected a value in [0, inf)'),
    ('model.drop_path', 1.0, 'expected a value in [0, 1)'),
    ('warmup_steps', -1, 'expected a value in [0, inf)'),
])
def test_every_number_is_checked_for_finiteness_and_range(key, value, expected):
  """Issue 28.4: `optim.lr=nan` passed validation and ran NaN steps."""
  from configs import mae as mae_config
  from mimjax import validate
  config = mae_config.get_config('tiny')
  validate.check_numbers(config)  # the shipped values pass
  with config.ignore_type():
    config.update_from_flattened_dict({key: value})
  with pytest.raises(ValueError) as e:
    validate.check_numbers(config)
  assert str(e.value) == f'config.{key}={value}: {expected}'


def test_evaluation_rerun_with_another_pretrained_is_refused(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'pretrained': str(tmp_path / 'a')}))
  same = ml_collections.ConfigDict({'pretrained': str(tmp_path / 'a')})
  main.check_eval_rerun(same, str(tmp_path), allow_change=False)
  other = ml_collections.ConfigDict({'pretrained': str(tmp_path / 'b')})
  with pytest.raises(ValueError, match='holds an evaluation of pretrained=.*/a.*--allow_config'):
    main.check_eval_rerun(other, str(tmp_path), allow_change=False)
  main.check_eval_rerun(other, str(tmp_path), allow_change=True)


@pytest.fixture
def cache_setting():
  old = jax.config.jax_compilation_cache_dir
  yield
  jax.config.update('jax_compilation_cache_dir', old)


@pytest.mark.parametrize('env,expected', [
    ({'MIMJAX_COMPILATION_CACHE': 'off'}, None),
    ({'MIMJAX_COMPILATION_CACHE': '/x/jax'}, '/x/jax'),
    ({'XDG_CACHE_HOME': '/xdg'}, '/xdg/mimjax/jax'),
])
def test_compilation_cache_dir(monkeypatch, cache_setting, env, expected):
  monkeypatch.delenv('MIMJAX_COMPILATION_CACHE', raising=False)
  jax.config.update('jax_compilation_cache_dir', None)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert main.enable_compilation_cache() == expected
  assert jax.config.jax_compilation_cache_dir == expected


def test_os_errors_name_the_file_or_the_workdir():
  """Issue 28.5: a full disk at start-up said `[Errno 28] No space left on device`, no path."""
  import errno
  assert main._one_line(OSError(errno.ENOSPC, 'No space left on device'), 'w') == (
      f'{os.path.abspath("w")}: No space left on device; free space there or use another '
      '--workdir')
  assert main._one_line(PermissionError(errno.EACCES, 'Permission denied', '/w/x'), 'w') == (
      '/w/x: Permission denied')
  assert main._one_line(ValueError('a\nb'), 'w') == 'a b'


def test_out_of_memory_is_one_line_with_the_knobs():
  """Issue 28.5: an out-of-memory batch was a 40-line traceback (and the process lingered)."""
  config = ml_collections.ConfigDict({'batch_size': 32768, 'grad_accum': 1})
  error = RuntimeError('INTERNAL: Error dispatching computation: Out of memory allocating '
                       '31789031616 bytes.')
  assert main.out_of_memory_message(error, config) == (
      'out of memory allocating 29.6 GiB (config.batch_size=32768, grad_accum=1); lower '
      '--config.batch_size, split it into micro-batches with --config.grad_accum=2, or use '
      '--config.model.remat=True or --config.model.dtype=bfloat16')
  assert main.out_of_memory_message(RuntimeError('INTERNAL: something else'), config) is None
