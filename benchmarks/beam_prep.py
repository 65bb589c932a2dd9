"""Data-prep throughput: Beam DirectRunner with 1 vs 2 workers (and the process-pool
path for reference) on a FaceCaption-style parquet of a few thousand records.

  python benchmarks/beam_prep.py [--records 3000] [--workers 1 2] [--image 256]

Each record is a JPEG scene (--image px square) with a face box; prep decodes it,
crops the face to 224 px, re-encodes it and writes ArrayRecord shards. Prints
records/s per configuration and the 2-vs-1 worker ratio. Needs the `beam` extra.
"""

import argparse
import io
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_prep import registry  # pylint: disable=wrong-import-position


def make_corpus(path, records: int, image: int, row_group: int = 250):
  rng = np.random.default_rng(0)
  base = rng.integers(0, 255, (image, image, 3), dtype=np.uint8)
  rows = []
  for i in range(records):
    arr = np.roll(base, i, axis=1)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, 'JPEG', quality=90)
    s = image // 4
    rows.append({'url': f'http://example/{i}.jpg', 'face_bbox': [s, s, 3.0 * s, 3.0 * s],
                 'face_caption': f'a face, record {i}',
                 'image': {'bytes': buf.getvalue(), 'path': None}})
  os.makedirs(path, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), os.path.join(path, 'FaceCaption-v1.parquet'),
                 row_group_size=row_group)


def run(src, out, records, **kw):
  shutil.rmtree(out, ignore_errors=True)
  t = time.perf_counter()
  report = registry.prepare('facecaption', src, out, **kw)
  dt = time.perf_counter() - t
  assert report.total_written == records, report
  return dt


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--records', type=int, default=3000)
  p.add_argument('--image', type=int, default=256)
  p.add_argument('--workers', type=int, nargs='+', default=[1, 2])
  p.add_argument('--no_pool', action='store_true', help='skip the process-pool reference runs')
  args = p.parse_args()
  tmp = tempfile.mkdtemp(prefix='beam_prep_')
  src = os.path.join(tmp, 'src')
  t = time.perf_counter()
  make_corpus(src, args.records, args.image)
  print(f'corpus: {args.records} records, {args.image}px JPEG scenes '
        f'({time.perf_counter() - t:.1f}s to make), {os.cpu_count()} CPUs')
  results = {}
  for w in args.workers:
    configs = [('beam DirectRunner', dict(runner='DirectRunner'))]
    if not args.no_pool:
      configs.append(('process pool', {}))
    for label, kw in configs:
      dt = run(src, os.path.join(tmp, 'out'), args.records, workers=w, **kw)
      results[(label, w)] = dt
      print(f'{label:18s} workers={w}: {dt:6.1f}s  {args.records / dt:7.1f} records/s', flush=True)
  for label in ('beam DirectRunner', 'process pool'):
    ws = sorted(w for (lab, w) in results if lab == label)
    if len(ws) > 1:
      print(f'{label}: workers {ws[-1]} vs {ws[0]}: '
            f'{results[(label, ws[0])] / results[(label, ws[-1])]:.2f}x throughput')
  shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
