"""The tfds builder shared by every real-dataset source (ArrayRecord, no TensorFlow).

`make_builder(SourceCls)` returns a `tfds.core.GeneratorBasedBuilder` registered under
the source's name, with one tfds config per source config (e.g. `ferplus/majority`).
Generation runs the source's `process` over its units

  * in this process (workers=1) or a spawn process pool (workers>1), or
  * as an Apache Beam pipeline (`runner=...`, see data_prep/beam.py), for corpora too
    large for one machine;

tallies written records, skips and exclusions (the `Report`), stores the report in
the dataset's metadata, and fails -- leaving no dataset behind -- when more than
`max_skip_fraction` of the inputs were skipped.
"""

import contextlib
import json
import multiprocessing
import os

import tensorflow_datasets as tfds
from etils import epath

from data_prep import tfds_writer
from data_prep.builders import common
from unifer_jax.data import schema

VERSION = tfds.core.Version('1.0.0')
_TALLY_FILE = '_tally-{split}.json'


class SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generic builder; subclasses (made by `make_builder`) set SOURCE."""

  SOURCE: type = common.Source
  VERSION = VERSION
  RELEASE_NOTES = {'1.0.0': 'Reads the source in its shipped layout (see DATASETS.md).'}
  code_path = epath.Path(__file__)   # builders outside a tfds package dir (see synthetic_faces)

  def __init__(self, *, src=None, workers: int = 1, beam: bool = False,
               max_skip_fraction: float = 0.01, source_options: dict | None = None, **kwargs):
    if not 0 <= max_skip_fraction <= 1:
      raise ValueError(f'max_skip_fraction must be in [0, 1], got {max_skip_fraction}')
    if workers < 1:
      raise ValueError(f'workers must be >= 1, got {workers}')
    self.workers, self.beam, self.max_skip_fraction = workers, beam, max_skip_fraction
    self.tally = common.Tally()
    self._pool = None
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)
    options = dict(self.SOURCE.configs[self.builder_config.name]) if self.builder_config else {}
    options.update(source_options or {})
    # src=None: a read-only builder (what `tfds.data_source(name, data_dir=...)` makes).
    self.source = None if src is None else self.SOURCE(src, **options)
    self.final_dir = os.fspath(self.data_dir)   # data_dir points at a temp dir while generating
    self.report = None

  def _make_report(self) -> common.Report:
    label = f'{self.name}/{self.builder_config.name}' if self.builder_config else self.name
    return common.Report.from_tally(label, self.final_dir, self.tally, self.max_skip_fraction)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=self.SOURCE.description,
        features=schema.features(frames=self.SOURCE.clip_frames),
        metadata=tfds.core.MetadataDict())

  def _download_and_prepare(self, dl_manager, download_config):
    writer_memory = contextlib.nullcontext() if self.beam else tfds_writer.splits_in_memory(
        self.name, 'prepare it with Beam (--runner DirectRunner --workers N)')
    with writer_memory:
      if self.workers > 1 and not self.beam:
        # spawn: safe under threads; workers import only the tfds-free source modules.
        with multiprocessing.get_context('spawn').Pool(self.workers) as self._pool:
          super()._download_and_prepare(dl_manager, download_config)
        self._pool = None
      else:
        super()._download_and_prepare(dl_manager, download_config)
    if self.beam:   # the pipeline has run: collect the tallies its splits wrote
      for f in self.data_path.glob(_TALLY_FILE.format(split='*')):
        self.tally.merge(common.Tally.from_json(json.loads(f.read_text())))
        f.unlink()
    self.report = self._make_report()
    self.info.metadata['report'] = self.report.to_json()
    if self.report.failed:
      # Raised inside tfds' incomplete-dir context: the partial dataset is removed.
      raise common.SkipFractionExceeded(self.report)

  def _split_generators(self, dl_manager):
    del dl_manager
    if self.source is None:
      raise ValueError(f'{self.name}: generating needs src= (the dataset folder as it ships)')
    units = {s: list(u) for s, u in self.source.scan(self.tally).items()}
    units = {s: u for s, u in units.items() if u and self._yields_a_record(s, u)}
    if not units:
      self.report = self._make_report()
      raise common.SkipFractionExceeded(self.report)
    if self.beam:
      from data_prep import beam as beam_lib  # pylint: disable=g-import-not-at-top
      return {s: beam_lib.split_transform(
          u, self.source, s, os.fspath(self.data_path / _TALLY_FILE.format(split=s)))
              for s, u in units.items()}
    return {s: self._generate_examples(s, u) for s, u in units.items()}

  def _yields_a_record(self, split, units) -> bool:
    """Whether some unit of `split` makes a record (tfds refuses to write an empty
    split). Runs units here until the first record -- normally the first unit's
    first outcome; those outcomes are dropped, generation makes them again. When no
    unit makes one, every outcome is tallied and the split is left out."""
    probe = common.Tally()
    for unit in units:
      try:
        for o in self.source.process(unit):   # lazily: stop at the first record
          if isinstance(o, common.Ok):
            return True
          probe.add(o, split)
      except common.Skip as e:
        probe.add(e.outcome, split)
    self.tally.merge(probe)
    return False

  def _generate_examples(self, split, units):  # pylint: disable=arguments-differ
    if self._pool is not None:
      chunk = max(1, min(64, len(units) // (4 * self.workers)))
      results = self._pool.imap(self.source.run, units, chunksize=chunk)
    else:
      results = map(self.source.run, units)
    for outcomes in results:
      for o in outcomes:
        self.tally.add(o, split)
        if isinstance(o, common.Ok):
          yield o.key, o.record


def make_builder(source_cls: type) -> type:
  """A registered tfds builder class named `source_cls.name` with its configs."""
  attrs = {'SOURCE': source_cls, 'name': source_cls.name, '__module__': __name__,
           '__doc__': source_cls.description}
  if list(source_cls.configs) != ['default']:
    attrs['BUILDER_CONFIGS'] = [
        tfds.core.BuilderConfig(name=n, description=f'{source_cls.name} with {opts}')
        for n, opts in source_cls.configs.items()]
  cls_name = ''.join(p.capitalize() for p in source_cls.name.split('_')) + 'Builder'
  return type(cls_name, (SourceBuilder,), attrs)
