"""A dead or hung peer stops the others within ``peer_timeout_s``, naming it.

Without this, a process whose peer died waits inside the next collective: gloo (CPU) and
the TPU/GPU runtimes block, and JAX's own heartbeat check aborts the process only after
its ``heartbeat_timeout_seconds`` with a C++ stack trace. A peer that is alive but stuck
(a data read that never returns, a deadlock in Python) keeps heartbeating and is never
noticed at all. So every process runs a watcher thread over the coordination service's
key-value store (the one ``jax.distributed`` starts; orbax uses it too):

* each process publishes ``<sign of life> <progress marker>`` under
  ``unifer/peer/<process>`` every poll (``poll_s``: peer_timeout_s / 10, 0.5-10 s); the
  train loop moves the marker at every step (:func:`progress`);
* a peer whose sign of life has not changed for ``peer_timeout_s`` is **lost** (killed,
  crashed, frozen);
* while this process has made no progress for ``peer_timeout_s``, a peer whose marker
  is behind ours is **hung** (we wait for it in a collective). Peers that are all at the
  same marker are in the same long operation (an eval, a save) -- never a reason to stop;
* the coordination service unreachable for ``peer_timeout_s``: process 0 is lost. (In
  practice JAX is quicker there: when process 0, which hosts the service, dies, the
  others' error poll fails and JAX ends them at once -- 0.5 s after a kill -9 here,
  with "Terminating process because the JAX distributed service detected fatal errors".)

Then the watcher prints what it saw (``peer watch: process 1 is lost: ...``) and ends
the process with exit code 75 (EX_TEMPFAIL: rerun) at once -- ``os._exit``, because the
main thread is blocked in a collective and a clean shutdown would wait at JAX's
shutdown barrier for the lost peer. The last committed checkpoint is intact (orbax
commits a checkpoint atomically; a half-written one is ignored), so rerunning the same
command resumes from it (tests/test_peer_watch.py). JAX's heartbeat check stays as the
backstop, set a little longer (``distributed.initialize``).

The timeout is ``config.peer_timeout_s`` for ``unifer train`` and ``UNIFER_PEER_TIMEOUT_S``
for every command (default 180 s: a lost peer stops the job within ~3 minutes).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

EXIT_CODE = 75
DEFAULT_TIMEOUT_S = 180.0
_KEY = 'unifer/peer/'
DONE = 'done'   # what a finished process publishes in place of its sign of life
FAILED = 'failed'   # appended to its sign of life by a process leaving on an exception

_watch: 'PeerWatch | None' = None


def start(timeout_s: float) -> None:
  """Starts the watcher of this process (once; a no-op for a single process)."""
  global _watch
  import jax  # pylint: disable=g-import-not-at-top
  if _watch is None and jax.process_count() > 1:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
    _watch = PeerWatch(jax_distributed.global_state.client, jax.process_index(),
                       jax.process_count(), timeout_s)
    # Registered after jax.distributed's own exit hook, so it runs first: a process that
    # is done stops its thread (one still calling the coordination service while the
    # interpreter finalises aborts the process: "FATAL: exception not rethrown") and says
    # it is done, so a peer still writing its report does not take it for lost.
    atexit.register(_watch.stop)


def progress(marker: int) -> None:
  """This process reached ``marker`` (the train loop: the step it is about to run)."""
  if _watch is not None:
    _watch.progress(marker)


class PeerWatch:
  """The watcher thread of one process (see the module docstring)."""

  def __init__(self, client, process: int, count: int, timeout_s: float, thread: bool = True):
    self.client, self.process, self.count = client, process, count
    self.timeout = float(timeout_s)
    if not self.timeout > 0:
      raise ValueError(f'peer_timeout_s={timeout_s}: expected a number of seconds > 0')
    self.poll = min(10.0, max(0.5, self.timeout / 10))
    now = time.monotonic()
    self.marker, self.marker_time = -1, now
    self.beats = 0
    self.failing = False        # leaving on an exception (_judge_before_failing)
    self.seen = {p: (None, now) for p in range(count) if p != process}   # value, when it changed
    self.reached = now          # last successful poll of the store
    self.entries: dict = {}     # what it held then
    self.exiting = threading.Event()
    self.thread = None
    if thread:   # (tests poll by hand)
      self.thread = threading.Thread(target=self._run, name='unifer-peer-watch', daemon=True)
      self.thread.start()

  def progress(self, marker: int) -> None:
    self.marker, self.marker_time = int(marker), time.monotonic()

  def _run(self) -> None:
    while not self.exiting.wait(self.poll):
      verdict = self.check()
      if verdict and not self.exiting.is_set():
        self._exit(verdict)

  def stop(self) -> None:
    """This process is done: no more judging or polling; peers read DONE and stop
    watching it. One leaving on an uncaught exception judges first (_judge_before_failing)."""
    self.exiting.set()
    if self.thread is not None:
      self.thread.join(timeout=self.poll + 5)
    if getattr(sys, 'last_value', None) is not None:   # set for an uncaught exception
      self._judge_before_failing()
    try:
      self.client.key_value_set(f'{_KEY}{self.process}', DONE, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  (the service may be gone already)
      pass

  def _judge_before_failing(self) -> None:
    """A collective with a dead peer can fail at once (gloo sees the closed connection)
    before the thread's verdict; the process would then wait at JAX's shutdown barrier
    for the dead peer until its heartbeat check aborts it, naming nobody. So a failing
    process keeps polling -- up to peer_timeout_s, or until every peer has finished or
    failed too -- and a lost peer ends it with EXIT_CODE, named."""
    self.failing = True
    deadline = time.monotonic() + self.timeout + self.poll
    while time.monotonic() < deadline:
      verdict = self.check()
      lost = [v for v in (verdict or '').split('; ') if ' is lost' in v]
      if lost:
        self._exit('; '.join(lost))
        return
      others = [self.entries.get(f'{_KEY}{p}') or '' for p in self.seen]
      if all(v == DONE or v.endswith(FAILED) for v in others):
        return
      time.sleep(self.poll)

  def check(self) -> str | None:
    """One poll: publish our sign of life, read the others'; what is wrong, if anything."""
    now = time.monotonic()
    self.beats += 1
    try:
      self.client.key_value_set(f'{_KEY}{self.process}', f'{self.beats} {self.marker}'
                                + (f' {FAILED}' if self.failing else ''), allow_overwrite=True)
      entries = self.entries = dict(self.client.key_value_dir_get(_KEY))
    except Exception as e:  # pylint: disable=broad-except  (the service's RPC errors vary)
      if now - self.reached > self.timeout:
        return (f'process 0 (the coordinator) is lost: its coordination service has been '
                f'unreachable for {now - self.reached:.0f} s ({type(e).__name__}: '
                f'{str(e).splitlines()[0][:160]})')
      return None
    self.reached = now
    lost, behind = [], []
    for p, (value, changed) in self.seen.items():
      entry = entries.get(f'{_KEY}{p}')
      if entry == DONE:   # finished its work: waiting at JAX's shutdown barrier
        continue
      if entry != value:
        self.seen[p] = (entry, now)
        changed = now
      if now - changed > self.timeout:
        lost.append(f'process {p} is lost: no sign of life for {now - changed:.0f} s')
      elif entry is not None and now - self.marker_time > self.timeout:
        marker = int(entry.split()[1])
        if 0 <= marker < self.marker:
          behind.append(f'process {p} is hung: alive but still before step {marker} '
                        f'while process {self.process} has waited at step {self.marker} for '
                        f'{now - self.marker_time:.0f} s')
    return '; '.join(lost + behind) or None

  def _exit(self, verdict: str) -> None:
    sys.stdout.flush()
    print(f'peer watch: {verdict} (peer_timeout_s={self.timeout:g}). Process {self.process} '
          f'stops here with exit code {EXIT_CODE}; the last committed checkpoint is intact: '
          f'rerun the same command to resume.', file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)  # the main thread is blocked in a collective with the lost peer
