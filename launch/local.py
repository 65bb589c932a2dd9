#!/usr/bin/env python3
"""Run N cooperating processes of one command on this machine (CPU collectives, loopback).

  python launch/local.py -n 2 -- unifer train --config configs/smoke.py:tiny --workdir /tmp/w

Each process gets UNIFER_COORDINATOR=127.0.0.1:PORT, UNIFER_NUM_PROCESSES, UNIFER_PROCESS_ID
(read by unifer_jax.distributed), JAX_PLATFORMS=cpu, and its share of the fake CPU
devices (--devices total, split evenly). Output lines are prefixed with [pI]. If one
process fails, the others are stopped and the exit code is the first failure's; with
--keep-going they are left to find out themselves, as hosts of a pod would (the peer
watch stops them within peer_timeout_s, exit code 75).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _pump(stream, prefix: str):
  for line in iter(stream.readline, b''):
    sys.stdout.write(f'{prefix} {line.decode(errors="replace")}')
    sys.stdout.flush()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('-n', '--num_processes', type=int, default=2)
  p.add_argument('--devices', type=int, default=8, help='fake CPU devices in total')
  p.add_argument('--port', type=int, default=0, help='coordinator port (0 = pick a free one)')
  p.add_argument('--keep-going', action='store_true',
                 help='do not kill the others when one process fails (as on separate hosts)')
  p.add_argument('command', nargs=argparse.REMAINDER)
  args = p.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    p.error('give the command after --')
  if args.devices % args.num_processes:
    p.error(f'--devices {args.devices} is not divisible by -n {args.num_processes}')
  port = args.port or free_port()
  per_process = args.devices // args.num_processes
  # The caller's other XLA flags (dumps, optimisation level, ...) reach every process;
  # only the fake device count is ours.
  xla_flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
               if not f.startswith('--xla_force_host_platform_device_count')]
  xla_flags.append(f'--xla_force_host_platform_device_count={per_process}')
  procs = []
  for i in range(args.num_processes):
    env = dict(os.environ,
               UNIFER_COORDINATOR=f'127.0.0.1:{port}',
               UNIFER_NUM_PROCESSES=str(args.num_processes),
               UNIFER_PROCESS_ID=str(i),
               JAX_PLATFORMS='cpu',
               XLA_FLAGS=' '.join(xla_flags))
    # Same process group as the launcher: `kill -9 -PGID` of the job takes every process.
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threading.Thread(target=_pump, args=(proc.stdout, f'[p{i}]'), daemon=True).start()
    procs.append(proc)
    print(f'[launch] process {i}: pid {proc.pid}', flush=True)

  def forward(signum, _frame):
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  exit_code = 0
  remaining = set(range(len(procs)))
  while remaining:
    for i in list(remaining):
      try:
        code = procs[i].wait(timeout=0.2)
      except subprocess.TimeoutExpired:
        continue
      remaining.discard(i)
      if code != 0 and args.keep_going:
        exit_code = exit_code or code
        print(f'[launch] process {i} exited with {code}', flush=True)
      elif code != 0 and exit_code == 0:
        exit_code = code
        print(f'[launch] process {i} exited with {code}; killing the others', flush=True)
        # A collective with a dead peer can neither finish nor save: kill, don't ask.
        for j in remaining:
          if procs[j].poll() is None:
            procs[j].kill()
  return exit_code


if __name__ == '__main__':
  sys.exit(main())
