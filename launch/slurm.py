#!/usr/bin/env python3
r"""Submit ``launch/slurm.sbatch`` for a ``unifer`` command on a SLURM GPU cluster.

  python launch/slurm.py --nodes 2 --partition gpu --time 12:00:00 \
      -- unifer train --config configs/smoke.py:7b --workdir /shared/runs/7b

One task per GPU (``--gpus-per-node`` tasks on each node); ``--dry-run`` prints the
``sbatch`` command without submitting it. See the header of slurm.sbatch for how the
processes find each other (JAX reads SLURM's environment) and what the venv needs.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

SBATCH = Path(__file__).resolve().with_name('slurm.sbatch')


def sbatch_command(args, command: list[str]) -> list[str]:
  if command[:1] != ['unifer'] or len(command) < 2:
    raise ValueError(f'expected a unifer command after --, got {shlex.join(command) or "nothing"}')
  cmd = ['sbatch', f'--job-name={args.job_name}', f'--nodes={args.nodes}',
         f'--ntasks-per-node={args.gpus_per_node}', f'--gpus-per-node={args.gpus_per_node}',
         f'--time={args.time}']
  if args.partition:
    cmd.append(f'--partition={args.partition}')
  if args.account:
    cmd.append(f'--account={args.account}')
  cmd += args.sbatch_arg or []
  return cmd + [str(SBATCH), *command[1:]]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--nodes', type=int, default=1)
  p.add_argument('--gpus-per-node', type=int, default=8)
  p.add_argument('--time', default='24:00:00')
  p.add_argument('--partition')
  p.add_argument('--account')
  p.add_argument('--job-name', default='unifer')
  p.add_argument('--sbatch-arg', action='append', help='extra sbatch flag, e.g. --sbatch-arg=--exclusive')
  p.add_argument('--dry-run', action='store_true', help='print the sbatch command, submit nothing')
  p.add_argument('command', nargs=argparse.REMAINDER, help='-- unifer train ...')
  args = p.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  try:
    cmd = sbatch_command(args, command)
  except ValueError as e:
    p.error(str(e))
  print(shlex.join(cmd), flush=True)
  return 0 if args.dry_run else subprocess.call(cmd)


if __name__ == '__main__':
  sys.exit(main())
