#!/usr/bin/env python3
r"""Run one ``unifer`` command on every worker of a Cloud TPU pod slice (gcloud or xpk).

  # TPU VM: create the slice, ship this checkout, install, train on all workers.
  python launch/tpu_pod.py --name unifer-7b --zone us-east5-a --accelerator v5p-128 \
      -- unifer train --config configs/smoke.py:7b --workdir gs://BUCKET/runs/7b

  # Multislice on TPU VMs: N slices as one queued resource (nodes NAME-0 ... NAME-{N-1}),
  # joined by the data-centre network; the run spans them by config.mesh.dcn (default:
  # data parallel across slices). Check it first: unifer compile-check ... --num_slices 2.
  python launch/tpu_pod.py --name unifer-7b --zone us-east5-a --accelerator v5p-128 \
      --num-slices 2 -- unifer train --config configs/smoke.py:7b --workdir gs://BUCKET/runs/7b

  # GKE with xpk: one workload (a JobSet) on an existing cluster, optionally multi-slice.
  python launch/tpu_pod.py --xpk --cluster my-cluster --name unifer-7b --accelerator v5p-128 \
      --num-slices 2 -- unifer train --config configs/smoke.py:7b --workdir gs://BUCKET/runs/7b

``--dry-run`` prints the exact commands, one per line, without running any. Every worker
runs the same command; ``jax.distributed`` initialises itself from the TPU environment
(see ``unifer_jax/distributed.py``; multislice workers also get the ``MEGASCALE_*``
variables from the queued resource or xpk) and each process reads only its shard of the
data, so the workdir must be shared storage (a ``gs://`` path) for checkpoints and metrics.

Code reaches the workers either as this checkout (``git archive`` of ``--ref``, default
HEAD, copied with ``scp --worker=all``: uncommitted edits are *not* shipped) or, with
``--repo URL``, as a ``git clone`` of ``--ref`` on every worker.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

# Product name -> gcloud/xpk accelerator type and the TPU VM runtime image for it.
RUNTIMES = {'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite',
            'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}
REPO = Path(__file__).resolve().parents[1]
REMOTE_DIR = 'unifer'
ARCHIVE = '/tmp/unifer-code.tar.gz'
XPK_BASE_IMAGE = 'us-docker.pkg.dev/cloud-tpu-images/jax-ai-image/tpu:latest'


def accelerator_type(name: str) -> str:
  """'v5e-16' -> 'v5litepod-16' (Cloud's name); v4-N / v5p-N / v6e-N unchanged."""
  m = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)-(\d+)', name)
  if not m:
    raise ValueError(f'--accelerator {name!r}: expected a TPU product name such as '
                     'v5p-128, v5e-16 (= v5litepod-16), v6e-64 or v4-32')
  family = 'v5litepod' if m.group(1) == 'v5e' else m.group(1)
  return f'{family}-{m.group(2)}'


def _where(args) -> list[str]:
  out = [f'--zone={args.zone}']
  if args.project:
    out.append(f'--project={args.project}')
  return out


def _multislice(args) -> bool:
  return args.num_slices > 1


def _all_workers(args) -> list[str]:
  return ['--node=all', '--worker=all'] if _multislice(args) else ['--worker=all']


def _tpus(args) -> list[str]:
  """A slice is a TPU VM; several slices are one queued resource of N nodes (the only way
  Cloud TPU offers multislice)."""
  return ['gcloud', 'compute', 'tpus', 'queued-resources' if _multislice(args) else 'tpu-vm']


def _ssh(args, remote: str) -> list[str]:
  return [*_tpus(args), 'ssh', args.name, *_where(args), *_all_workers(args),
          f'--command={remote}']


def create_commands(args, accel: str, version: str) -> list[list[str]]:
  """One slice: ``tpu-vm create``. N slices: a queued resource of N nodes, then a wait
  until it is ACTIVE (queued resources are granted asynchronously)."""
  if not _multislice(args):
    create = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', args.name, *_where(args),
              f'--accelerator-type={accel}', f'--version={version}']
    return [create + (['--spot'] if args.spot else [])]
  create = [*_tpus(args), 'create', args.name, *_where(args), f'--accelerator-type={accel}',
            f'--runtime-version={version}', f'--node-count={args.num_slices}',
            f'--node-prefix={args.name}']
  describe = shlex.join([*_tpus(args), 'describe', args.name, *_where(args),
                         '--format=value(state.state)'])
  wait = f'until [ "$({describe})" = ACTIVE ]; do sleep 30; done'
  return [create + (['--spot'] if args.spot else []), ['bash', '-c', wait]]


def remote_train_command(command: list[str], detach: bool) -> str:
  """The shell line each worker runs: the venv's ``unifer`` in the checkout."""
  if command[:1] == ['unifer']:
    command = ['.venv/bin/unifer', *command[1:]]
  run = shlex.join(command)
  if detach:  # survives the ssh session; each worker logs to ~/unifer-train.log
    run = f'nohup {run} > ~/unifer-train.log 2>&1 &'
  return f'cd {REMOTE_DIR} && {run}'


def install_command(python: str) -> str:
  """The package needs Python >= 3.11; TPU VM images ship an older python3, so uv
  fetches the interpreter and builds the venv."""
  uv = '~/.local/bin/uv'
  return (f'cd {REMOTE_DIR} && python3 -m pip install -q --user uv && '
          f'{uv} venv -q --python {python} .venv && '
          f'{uv} pip install -q --python .venv/bin/python -e ".[tpu,gcs]"')


def gcloud_commands(args, command: list[str]) -> list[list[str]]:
  """create -> code -> install -> run, each an argv list."""
  accel = accelerator_type(args.accelerator)
  version = args.version or RUNTIMES[accel.split('-')[0]]
  cmds = [] if args.skip_create else create_commands(args, accel, version)
  if args.repo:
    cmds.append(_ssh(args, f'rm -rf {REMOTE_DIR} && git clone {shlex.quote(args.repo)} '
                           f'{REMOTE_DIR} && cd {REMOTE_DIR} && git checkout '
                           f'{shlex.quote(args.ref)}'))
  else:
    cmds.append(['git', '-C', str(REPO), 'archive', '--format=tar.gz', f'--output={ARCHIVE}',
                 args.ref])
    cmds.append([*_tpus(args), 'scp', ARCHIVE, f'{args.name}:~/', *_where(args),
                 *_all_workers(args)])
    cmds.append(_ssh(args, f'rm -rf {REMOTE_DIR} && mkdir {REMOTE_DIR} && '
                           f'tar -xzf unifer-code.tar.gz -C {REMOTE_DIR}'))
  cmds.append(_ssh(args, install_command(args.python)))
  cmds.append(_ssh(args, remote_train_command(command, args.detach)))
  return cmds


def xpk_commands(args, command: list[str]) -> list[list[str]]:
  """One ``xpk workload create``: xpk builds an image from --script-dir on the base image."""
  if not args.cluster:
    raise ValueError('--xpk needs --cluster (an existing GKE cluster made by xpk cluster create)')
  accel = accelerator_type(args.accelerator)
  # The container starts in the script dir (the image's working directory).
  remote = f'pip install -q -e ".[tpu,gcs]" && {shlex.join(command)}'
  cmd = ['xpk', 'workload', 'create', f'--cluster={args.cluster}', f'--workload={args.name}',
         f'--tpu-type={accel}', f'--num-slices={args.num_slices}']
  if args.zone:
    cmd.append(f'--zone={args.zone}')
  if args.project:
    cmd.append(f'--project={args.project}')
  if args.docker_image:
    cmd.append(f'--docker-image={args.docker_image}')
  else:
    cmd += [f'--base-docker-image={args.base_docker_image}', f'--script-dir={args.script_dir}']
  if args.spot:
    cmd.append('--spot')
  cmd.append(f'--command={remote}')
  return [cmd]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--name', required=True, help='TPU VM name (gcloud) or workload name (xpk)')
  p.add_argument('--accelerator', required=True, help='v5p-128 | v5e-16 | v6e-64 | v4-32 ...')
  p.add_argument('--zone', help='e.g. us-east5-a (required for gcloud)')
  p.add_argument('--project')
  p.add_argument('--version', help='TPU VM runtime (default: the one for the accelerator)')
  p.add_argument('--spot', action='store_true', help='spot/preemptible capacity')
  p.add_argument('--skip-create', action='store_true', help='reuse an existing TPU VM')
  p.add_argument('--ref', default='HEAD', help='git ref to ship or check out (default HEAD)')
  p.add_argument('--repo', help='git URL to clone on the workers instead of copying this checkout')
  p.add_argument('--python', default='3.11', help='Python version for the workers\' venv')
  p.add_argument('--detach', action='store_true', help='run under nohup; logs in ~/unifer-train.log')
  p.add_argument('--xpk', action='store_true', help='submit an xpk workload instead (GKE)')
  p.add_argument('--cluster', help='xpk: the GKE cluster')
  p.add_argument('--num-slices', type=int, default=1,
                 help='slices joined by the data-centre network (gcloud: one queued resource '
                 'of N nodes; xpk: --num-slices)')
  p.add_argument('--docker-image', help='xpk: a ready image (else base image + script dir)')
  p.add_argument('--base-docker-image', default=XPK_BASE_IMAGE)
  p.add_argument('--script-dir', default='.', help='xpk: directory baked into the image')
  p.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  p.add_argument('command', nargs=argparse.REMAINDER, help='-- unifer train ...')
  args = p.parse_args(argv)
  args.command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not args.command:
    p.error('give the command to run on every worker after --, e.g. -- unifer train ...')
  if not args.xpk and not args.zone:
    p.error('--zone is required (gcloud TPU VMs are zonal)')
  if args.num_slices < 1:
    p.error(f'--num-slices {args.num_slices}: expected 1 or more')
  return args


def format_command(argv: list[str]) -> str:
  """A copy-pasteable shell line; ``--flag=value`` is printed as ``--flag='value'``."""
  parts = []
  for arg in argv:
    flag, eq, value = arg.partition('=')
    if arg.startswith('--') and eq and re.fullmatch(r'--[\w-]+', flag):
      parts.append(flag + '=' + shlex.quote(value))
    else:
      parts.append(shlex.quote(arg))
  return ' '.join(parts)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    cmds = xpk_commands(args, args.command) if args.xpk else gcloud_commands(args, args.command)
  except ValueError as e:
    print(f'tpu_pod.py: {e}', file=sys.stderr)
    return 2
  for cmd in cmds:
    print(format_command(cmd), flush=True)
    if not args.dry_run:
      code = subprocess.call(cmd)
      if code:
        print(f'tpu_pod.py: command failed with exit code {code}', file=sys.stderr)
        return code
  return 0


if __name__ == '__main__':
  sys.exit(main())
