"""Apache Beam side of `unifer prep` (optional extra: `pip install -e '.[beam]'`).

tfds runs a builder's split as a Beam pipeline when its `_split_generators` returns
a `beam.PTransform`; `split_transform` is that transform for any `Source`:

  units --Create--> Reshuffle (spread over workers) --ParDo(source.run)--> records
                                                                 \\--> per-unit Tally
                                                                       --Combine--> _tally-<split>.json

The records go to tfds' BeamWriter (ArrayRecord shards); the tally file is read back
by the builder after the pipeline finishes (it lives in the dataset's directory, so
it works on any filesystem the runner's workers share: local, gs://, ...).

`pipeline_options(runner, workers, beam_args)` builds the options: DirectRunner with
`workers` processes here; Dataflow / Flink / Spark take their own flags in
`beam_args` (see the README).
"""

import apache_beam as beam
from apache_beam.options import pipeline_options as beam_options
from etils import epath

from data_prep.builders import common


class _Process(beam.DoFn):
  """Runs one unit; emits (key, record) and, tagged 'tally', the unit's small Tally."""

  def __init__(self, source, split):
    super().__init__()
    self.source, self.split = source, split

  def process(self, unit):
    tally = common.Tally()
    for o in self.source.run(unit):
      tally.add(o, self.split)
      if isinstance(o, common.Ok):
        yield o.key, o.record
    yield beam.pvalue.TaggedOutput('tally', tally)


class _MergeTallies(beam.CombineFn):

  def create_accumulator(self):
    return common.Tally()

  def add_input(self, acc, tally):
    return acc.merge(tally)

  def merge_accumulators(self, accs):
    accs = iter(accs)
    first = next(accs)
    for a in accs:
      first.merge(a)
    return first

  def extract_output(self, acc):
    return acc


def _save(tally, path):
  epath.Path(path).write_text(common.dumps(tally.to_json()))


def split_transform(units, source, split: str, tally_path: str):
  """The PTransform tfds applies to its pipeline for one split."""

  @beam.ptransform_fn
  def _transform(pipeline):
    out = (pipeline
           | 'Units' >> beam.Create(units)
           | 'Spread' >> beam.Reshuffle()
           | 'Process' >> beam.ParDo(_Process(source, split)).with_outputs('tally', main='records'))
    _ = (out.tally
         | 'MergeTallies' >> beam.CombineGlobally(_MergeTallies())
         | 'SaveTally' >> beam.Map(_save, tally_path))
    return out.records

  return _transform()  # pylint: disable=no-value-for-parameter


def pipeline_options(runner: str | None, workers: int = 1, beam_args=()):
  """Options for `runner`; DirectRunner gets `workers` local processes."""
  args = list(beam_args or ())
  runner = runner or 'DirectRunner'
  args.append(f'--runner={runner}')
  if runner == 'DirectRunner':
    args += [f'--direct_num_workers={workers}',
             '--direct_running_mode=' + ('multi_processing' if workers > 1 else 'in_memory')]
  return beam_options.PipelineOptions(args)
