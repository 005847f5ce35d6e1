"""Multi-host start-up and a watch on the other hosts of the job (used by mimjax.main)."""

import os
import socket
import threading
import time
from typing import Callable, Optional


# A survivor stops this long after a peer process last showed a sign of life. Heartbeats come
# from a thread of their own every PEER_BEAT_S, so a host busy compiling, evaluating or writing
# a checkpoint keeps beating; only a dead, frozen (SIGSTOP, swapping) or unreachable one goes
# quiet. 30 s rides out such stalls and network blips, and stops well before JAX's coordinator
# gives up (heartbeat_timeout_seconds=100: a 99-line fatal abort after ~90 s). Override with
# $MIMJAX_PEER_TIMEOUT_S.
PEER_TIMEOUT_S = 30.0
PEER_BEAT_S = 2.0


class PeerWatch:
  """Multi-host: exits this process with one line naming the host once another process of
  the job stops beating (through JAX's coordination key-value store)."""

  def __init__(self, client, process_id: int, num_processes: int, timeout_s: float,
               on_lost: Callable[[str], None]):
    self._client, self._me, self._timeout, self._on_lost = client, process_id, timeout_s, on_lost
    self._hosts = {process_id: socket.gethostname()}
    client.key_value_set(f'mimjax/host/{process_id}', self._hosts[process_id], True)
    self._peers = [p for p in range(num_processes) if p != process_id]
    self._done = threading.Event()
    threading.Thread(target=self._run, daemon=True, name='mimjax-peer-watch').start()

  def stop(self) -> None:
    """The run is over: peers leaving from now on are expected."""
    self._done.set()

  def settle(self) -> None:
    """After an unexpected error (a collective whose peer vanished fails at once on CPU):
    waits long enough for the verdict, so a lost peer is reported as such and not as this
    process's traceback; returns when every peer still beats."""
    time.sleep(self._timeout + 2 * PEER_BEAT_S)

  def _host(self, p: int) -> str:
    if p not in self._hosts:
      try:
        self._hosts[p] = self._client.key_value_try_get(f'mimjax/host/{p}')
      except Exception:  # pylint: disable=broad-except  (not written yet, or unreachable)
        return 'an unknown host'
    return self._hosts[p]

  def _run(self) -> None:
    beat, seen, last = 0, {}, {}
    start = reachable = time.monotonic()
    while True:  # beats on after stop(): a peer still finishing must not think us gone
      time.sleep(PEER_BEAT_S)
      now = time.monotonic()
      try:
        beat += 1
        self._client.key_value_set(f'mimjax/beat/{self._me}', str(beat), True)
        for p in self._peers:
          try:
            value = self._client.key_value_try_get(f'mimjax/beat/{p}')
          except Exception:  # pylint: disable=broad-except  (NOT_FOUND: not started yet)
            value = None
          if value is not None and value != seen.get(p):
            seen[p], last[p] = value, now
            self._host(p)
        reachable = now
      except Exception:  # pylint: disable=broad-except  (the coordinator, process 0, is gone)
        if now - reachable > self._timeout and not self._done.is_set():
          self._lost(0, now - reachable)
        continue
      quiet = [(now - last.get(p, start), p) for p in self._peers]
      silent, p = max(quiet, default=(0.0, None))
      if p is not None and silent > self._timeout and not self._done.is_set():
        self._lost(p, silent)

  def _lost(self, p: int, silent: float) -> None:
    what = 'the coordinator, process 0,' if p == 0 and p != self._me else f'process {p}'
    self._on_lost(
        f'mimjax: error: lost {what} on {self._host(p)}: no sign of life for {silent:.0f} s '
        f'(killed, crashed or unreachable; limit {self._timeout:g} s, '
        f'$MIMJAX_PEER_TIMEOUT_S); stopping process {self._me} too: restart the job to resume '
        'from the last checkpoint')


def watch_peers(on_lost: Callable[[str], None]) -> Optional[PeerWatch]:
  """A PeerWatch when this is one process of several (after maybe_initialize_distributed);
  `on_lost(message)` is called with the one line naming a lost host, and must end the process."""
  import jax
  from jax._src import distributed
  if jax.process_count() <= 1 or distributed.global_state.client is None:
    return None
  timeout = float(os.environ.get('MIMJAX_PEER_TIMEOUT_S', PEER_TIMEOUT_S))
  return PeerWatch(distributed.global_state.client, jax.process_index(), jax.process_count(),
                   timeout, on_lost)


def maybe_initialize_distributed() -> None:
  """Multi-host: `jax.distributed.initialize()` under SLURM, multi-host TPU or when asked."""
  import jax  # not at import: `--help` and flag errors answer without loading jax
  env = os.environ
  multi_slurm = int(env.get('SLURM_NTASKS', '1')) > 1
  multi_tpu = ',' in env.get('TPU_WORKER_HOSTNAMES', '')
  if env.get('MIMJAX_DISTRIBUTED') == '1' or multi_slurm or multi_tpu:
    kwargs = {}
    if env.get('MIMJAX_COORDINATOR'):  # explicit (e.g. local multi-process tests)
      kwargs = dict(coordinator_address=env['MIMJAX_COORDINATOR'],
                    num_processes=int(env['MIMJAX_NUM_PROCESSES']),
                    process_id=int(env['MIMJAX_PROCESS_ID']))
    jax.distributed.initialize(**kwargs)
