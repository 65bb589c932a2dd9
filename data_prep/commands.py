"""`unifer prep DATASET --src DIR --out DIR`: one entry for the built-in corpus and every
real-dataset builder (data_prep.registry)."""

from __future__ import annotations

import sys

from unifer_jax.data import schema

SYNTHETIC = 'synthetic_faces'
SYNTHETIC_CLIPS = 'synthetic_clips'   # the built-in clip corpus (same options, + --frames)


def add_parser(sub) -> None:
  s = sub.add_parser('prep', help='prepare a dataset as TFDS ArrayRecord (built-in corpus or a '
                     'real dataset from its shipped layout)')
  s.add_argument('dataset', help=f'{SYNTHETIC}, {SYNTHETIC_CLIPS} or a real dataset name '
                 '(rafdb, affectnet, dfew, ...)')
  s.add_argument('--src', help="the dataset's root folder as it ships (real datasets)")
  s.add_argument('--out', required=True, help='output data_dir')
  s.add_argument('--workers', type=int, default=2)
  s.add_argument('--runner', help='Apache Beam runner (DirectRunner, DataflowRunner, FlinkRunner, '
                 'SparkRunner); default: no Beam')
  s.add_argument('--max_skip_fraction', type=float, default=0.01)
  s.add_argument('--config', help='builder config (e.g. affectnet 7 / 8, ferplus label mode)')
  s.add_argument('--size', type=int, help=f'{SYNTHETIC}: number of faces (default 20000); '
                 f'{SYNTHETIC_CLIPS}: number of clips (default 1000)')
  s.add_argument('--seed', type=int, default=0, help=f'{SYNTHETIC}/{SYNTHETIC_CLIPS}: seed')
  s.add_argument('--image_size', type=int, default=112,
                 help=f'{SYNTHETIC}/{SYNTHETIC_CLIPS}: pixels')
  s.add_argument('--frames', type=int, default=schema.CLIP_FRAMES,
                 help=f'{SYNTHETIC_CLIPS}: frames per clip')
  s.add_argument('--compound_fraction', type=float, default=0.3,
                 help=f'{SYNTHETIC}/{SYNTHETIC_CLIPS}: share of compound expressions (0: basic '
                 'only, as configs/video.py was measured)')
  s.add_argument('--no_align', dest='align', action='store_false',
                 help=f'{SYNTHETIC}/{SYNTHETIC_CLIPS}: keep the raw frames (default: eye-line '
                 'aligned faces)')


def run(args, beam_args=()) -> int:
  if args.dataset == SYNTHETIC:
    from data_prep import synthetic_faces
    counts = synthetic_faces.prepare(args.out, size=args.size or 20000, seed=args.seed,
                                     image_size=args.image_size, workers=args.workers,
                                     compound_fraction=args.compound_fraction, align=args.align)
    print(f'{SYNTHETIC}: wrote {counts} under {args.out} (+ samples.png)')
    return 0
  if args.dataset == SYNTHETIC_CLIPS:
    from data_prep import synthetic_clips
    counts = synthetic_clips.prepare(args.out, size=args.size or 1000, seed=args.seed,
                                     image_size=args.image_size, frames=args.frames,
                                     workers=args.workers, align=args.align,
                                     compound_fraction=args.compound_fraction)
    print(f'{SYNTHETIC_CLIPS}: wrote {counts} under {args.out} (+ clip_samples.png)')
    return 0
  from data_prep import registry
  if args.dataset not in registry.BUILDERS:
    print(f'unifer prep: unknown dataset {args.dataset!r}; known: '
          f'{", ".join([SYNTHETIC, SYNTHETIC_CLIPS, *sorted(registry.BUILDERS)])}', file=sys.stderr)
    return 2
  if not args.src:
    print(f'unifer prep {args.dataset}: --src DIR (the dataset as it ships) is required',
          file=sys.stderr)
    return 2
  kwargs = {'config': args.config} if args.config else {}
  try:
    report = registry.prepare(args.dataset, args.src, args.out, workers=args.workers,
                              runner=args.runner, max_skip_fraction=args.max_skip_fraction,
                              beam_args=list(beam_args), **kwargs)
  except registry.SkipFractionExceeded as e:
    print(str(e), file=sys.stderr)
    return 1
  print(report)
  return 0
