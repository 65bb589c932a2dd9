"""The `unifer` command. Each subcommand is a thin entry into the library.

A subcommand that is not built yet says so and exits 2; it never fakes output.
"""

from __future__ import annotations

import argparse
import sys

# Subcommands announced but not built yet: name -> where they are tracked (none now).
NOT_BUILT: dict[str, str] = {}


def _not_built(name: str) -> int:
  print(f'unifer {name}: not built yet -- tracked in {NOT_BUILT[name]}.', file=sys.stderr)
  return 2


def _params(args) -> int:
  from unifer_jax.models import inspect as model_inspect
  names = args.preset or []
  configs = []
  if args.config:
    from unifer_jax import config_lib
    configs.append((args.config, config_lib.load(args.config, args.overrides).model))
  configs += [(n, n) for n in names]
  if not configs:
    print('unifer params: give --preset NAME... or --config FILE[:arg]', file=sys.stderr)
    return 2
  for label, model in configs:
    print(model_inspect.format_param_counts(label, model))
  return 0


def _train(args, overrides) -> int:
  from unifer_jax import distributed, workdirs
  try:
    config = workdirs.load_config(args.config, overrides, args.workdir)
  except FileNotFoundError as e:
    print(f'unifer train: {e}', file=sys.stderr)
    return 2
  distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                         peer_timeout_s=config.get('peer_timeout_s'))
  from unifer_jax.train import loop
  try:
    loop.train(config, args.workdir)
  except loop.Preempted:
    pass  # a clean stop: the checkpoint is committed and the same command resumes
  return 0


def _add_convert(sub) -> None:
  s = sub.add_parser('convert', help='Hugging Face <-> unifer tower checkpoints; parity check')
  conv = s.add_subparsers(dest='convert_command', required=True)
  dtypes = ('bfloat16', 'float32', 'float16')
  c = conv.add_parser('from-hf', help='HF model dir -> DIR/config.json + DIR/params (orbax)')
  c.add_argument('--src', required=True, help='HF model directory (config.json + safetensors)')
  c.add_argument('--out', required=True, help='new directory for the converted tower')
  c.add_argument('--dtype', choices=dtypes, help='cast the weights (default: keep their dtype)')
  c = conv.add_parser('to-hf', help='converted tower -> HF dir that from_pretrained loads')
  c.add_argument('--src', required=True, help='converted tower directory (or an HF directory)')
  c.add_argument('--out', required=True, help='new HF model directory')
  c.add_argument('--dtype', choices=dtypes, help='cast the weights (default: keep their dtype)')
  c.add_argument('--max-shard-size', default='2GB', help='safetensors shard size (default 2GB)')
  c = conv.add_parser('check', help='HF PyTorch model vs ours on the same random inputs')
  c.add_argument('--hf', required=True, help='HF model directory (the PyTorch reference)')
  c.add_argument('--src', required=True, help='converted tower directory (or an HF directory)')
  c.add_argument('--atol', type=float, default=1e-3, help='max abs diff allowed (default 1e-3)')
  c.add_argument('--max-kl', type=float, default=1e-4,
                 help='LLMs: max next-token KL allowed (default 1e-4)')
  c.add_argument('--batch', type=int, default=2)
  c.add_argument('--seq-len', type=int, default=16, help='tokens per sequence (LLM / BERT)')
  c.add_argument('--seed', type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='unifer', description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest='command', required=True)
  for name in NOT_BUILT:
    s = sub.add_parser(name, help=f'(not built yet: {NOT_BUILT[name]})')
    s.add_argument('rest', nargs=argparse.REMAINDER)
  s = sub.add_parser('train', help='train a config (any stage); resumes from the workdir')
  s.add_argument('--config', help='configs/X.py[:arg] or a config.json; then --config.key=value '
                 '... (default: the workdir\'s config.json, to resume a run as it was)')
  s.add_argument('--workdir', required=True, help='a folder or a URL (gs://BUCKET/run)')
  s.add_argument('--coordinator', help='host:port of process 0 (multi-process without a cluster)')
  s.add_argument('--num_processes', type=int)
  s.add_argument('--process_id', type=int)
  s = sub.add_parser('eval', help='run a config\'s evals on a workdir checkpoint; report.md/json '
                     '+ PNGs in the workdir')
  s.add_argument('--config', help='configs/X.py[:arg] holding evals (default: the workdir\'s '
                 'config.json); then --config.key=value ...')
  s.add_argument('--workdir', required=True, help='a training workdir (config.json + checkpoints/)')
  s.add_argument('--step', type=int, help='checkpoint step (default: the newest)')
  s = sub.add_parser('sweep', help='one evaluator over checkpoints x datasets x prompt sets / '
                     'decoding; resumable; CSV + markdown + PNGs in --out')
  s.add_argument('--config', required=True, help='configs/sweeps/X.py[:arg]; then --config.key=value')
  s.add_argument('--out', required=True, help='results folder (rerun with the same --out resumes)')
  s = sub.add_parser('predict', help='faces in images -> label probabilities, compound, intensity, '
                     'valence/arousal, rationale, uncertainty (JSON + an HTML report with the crops)')
  s.add_argument('--model', required=True, help='an exported student, a training workdir or '
                 'the workdir `unifer demo` wrote')
  s.add_argument('--backend', default='auto', choices=('auto', 'student', 'full'),
                 help='auto: the exported student when DIR has one, else the full model')
  s.add_argument('images', nargs='+', help='image or video files (a video: per-frame labels, '
                 'a clip label and a timeline PNG)')
  s.add_argument('--step', type=int, help='checkpoint step of a workdir (default: the newest)')
  s.add_argument('--out', help='write the JSON here instead of stdout')
  s.add_argument('--report', default='predict_report', help='folder for predict.html + the crops')
  _add_convert(sub)
  from unifer_jax.export import commands as export_commands
  export_commands.add_parser(sub)
  from data_prep import commands as prep_commands
  prep_commands.add_parser(sub)
  from unifer_jax.serve import command as serve_command
  serve_command.add_parser(sub)
  s = sub.add_parser('demo', help='the whole pipeline on the built-in corpus (CPU)')
  s.add_argument('--workdir', default='workdir/demo')
  s.add_argument('--size', type=int, default=20000, help='faces in the corpus')
  s.add_argument('--video', action='store_true', help='also the clip corpus, the video stage '
                 'and clip accuracy vs the frame vote (~5 min more on 2 cores)')
  s = sub.add_parser('compile-check', help='compile the train step for a TPU/GPU topology '
                     'here; report memory, FLOPs, collectives, roofline; exit 1 if it does not fit')
  s.add_argument('--config', required=True, help='configs/X.py[:arg]; then --config.key=value ...')
  s.add_argument('--topology', required=True,
                 help='v5p-128 | v5p:4x4x4 | v5e-16 | v6e-64 | v4-32 | h100x8 | gpu:h100x16 ...')
  s.add_argument('--num_slices', type=int, default=1,
                 help='TPU multislice: this many slices of --topology joined by the data-centre '
                 'network (config.mesh.dcn says which axes span them; default data parallel)')
  s.add_argument('--hbm_gib', type=float, help='override the HBM per device (GiB)')
  s.add_argument('--hlo', help='write the compiled HLO text to this file')
  s.add_argument('--json', help='write the report as JSON to this file')
  s = sub.add_parser('params', help='parameter counts of model presets / a config, built abstractly')
  s.add_argument('--preset', nargs='*', help='tiny demo base 7b')
  s.add_argument('--config', help='configs/X.py[:arg]')
  s.add_argument('overrides', nargs='*', help='--config.key=value')
  return p


def _extras_ok(command: str, unknown: list[str], config_overrides: bool = True) -> bool:
  """Arguments argparse did not know: ``--config.key=value`` for config-driven commands,
  nothing for the others."""
  bad = [u for u in unknown if not (config_overrides and u.startswith('--config.'))]
  if bad:
    print(f'unifer {command}: unknown arguments {bad}', file=sys.stderr)
  return not bad


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args, unknown = build_parser().parse_known_args(argv)
  if args.command == 'train':
    if not _extras_ok('train', unknown):
      return 2
    return _train(args, unknown)
  if args.command == 'demo':
    from unifer_jax import demo
    from unifer_jax.train import loop
    try:
      demo.run(args.workdir, size=args.size, video=args.video)
    except loop.Preempted as e:
      # The stages after the stopped one did not run: no report, and a non-zero code
      # (128 + SIGTERM, as if the signal had ended the process) so `make demo` says so.
      print(f'demo stopped: {e}', file=sys.stderr)
      return 143
    return 0
  if args.command == 'prep':
    from data_prep import commands as prep_commands
    return prep_commands.run(args, beam_args=unknown)
  if args.command == 'compile-check':
    if not _extras_ok('compile-check', unknown):
      return 2
    from unifer_jax.train import compile_check
    return compile_check.main(args, unknown)
  if args.command == 'eval':
    if not _extras_ok('eval', unknown):
      return 2
    from unifer_jax.evaluators import standalone
    return standalone.main(args, unknown)
  if args.command == 'sweep':
    if not _extras_ok('sweep', unknown):
      return 2
    from unifer_jax.evaluators import sweep
    args.overrides = unknown
    return sweep.main(args)
  if args.command == 'predict':
    if not _extras_ok('predict', unknown, config_overrides=False):
      return 2
    from unifer_jax import predict
    return predict.main(args)
  if args.command == 'serve':
    if not _extras_ok('serve', unknown, config_overrides=False):
      return 2
    from unifer_jax.serve import command as serve_command
    return serve_command.run(args)
  if args.command == 'params':
    args.overrides = list(args.overrides) + unknown
    return _params(args)
  if args.command == 'export':
    if not _extras_ok('export', unknown, config_overrides=False):
      return 2
    from unifer_jax.export import commands as export_commands
    return export_commands.run(args)
  if args.command == 'convert':
    if not _extras_ok('convert', unknown, config_overrides=False):
      return 2
    from unifer_jax.convert import commands
    return commands.run(args)
  return _not_built(args.command)


if __name__ == '__main__':
  sys.exit(main())
