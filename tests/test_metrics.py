"""mimjax.metrics: JSON lines + TensorBoard events, without importing torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CODE = '''
import sys
from mimjax import metrics
idle = metrics.MetricWriter(sys.argv[1], enabled=True)  # a re-run with nothing to do
idle.close()
import os
assert not os.path.exists(os.path.join(sys.argv[1], 'tensorboard')), 'an empty event file'
w = metrics.MetricWriter(sys.argv[1], enabled=True)
w.write(3, {'loss': 0.5, 'lr': 1e-3})
w.close()
assert 'torch' not in sys.modules, 'tensorboardX pulled in torch'
import torch  # the import guard is gone: torch still imports afterwards
print('ok')
'''


def test_writer_logs_json_and_events_without_importing_torch(tmp_path):
  """tensorboardX imports torch when installed (~5 s of every training start); mimjax's
  writer keeps it out and leaves `import torch` working."""
  out = subprocess.run([sys.executable, '-c', _CODE, str(tmp_path)], cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-2000:]
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert rows == [{'step': 3, 'loss': 0.5, 'lr': 1e-3}]
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tensorboard'))
