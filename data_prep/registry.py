"""Dataset name -> builder, and `prepare`, the one entry `unifer prep` calls.

  report = prepare('rafdb', '/data/RAF-DB', '/data/tfds')         # prints nothing itself
  print(report)                                                    # written / skipped by reason
  src = data_source('/data/tfds', 'rafdb', 'train')                # random access, no TF

A name may carry a config: 'ferplus/probability', 'affectnet/7class' (or pass
config='...'). Output: OUT/<name>/[<config>/]1.0.0/ in tfds ArrayRecord format, also
readable with `tfds.data_source('<name>[/<config>]', data_dir=OUT)` once this module
is imported (it registers the builders), or with `tfds.builder_from_directory`.
"""

import os
import shutil

import tensorflow_datasets as tfds

from data_prep.builders import (affectnet, base, ckplus, common, expw, fer2013, rafdb, sfew, text,
                                video)
from data_prep.builders.common import Report, SkipFractionExceeded  # pylint: disable=unused-import

SOURCES = {
    'rafdb': rafdb.RafdbBasic,
    'rafdb_compound': rafdb.RafdbCompound,
    'affectnet': affectnet.AffectNet,
    'fer2013': fer2013.Fer2013,
    'ferplus': fer2013.FerPlus,
    'sfew': sfew.Sfew,
    'expw': expw.ExpW,
    'ckplus': ckplus.CkPlus,
    'dfew': video.Dfew,
    'ferv39k': video.Ferv39k,
    'mafw': video.Mafw,
    'facecaption': text.FaceCaption,
    'celeba_dialog': text.CelebaDialog,
}
BUILDERS = {name: base.make_builder(cls) for name, cls in SOURCES.items()}


def _split_name(name: str, config: str | None):
  """'ferplus/probability' (or name='ferplus', config='probability') -> ('ferplus', 'probability')."""
  base_name, _, cfg = name.partition('/')
  if base_name not in SOURCES:
    raise ValueError(f'unknown dataset {base_name!r}; expected one of {sorted(SOURCES)}')
  if cfg and config and cfg != config:
    raise ValueError(f'dataset {name!r} names config {cfg!r} but config={config!r} was given')
  configs = list(SOURCES[base_name].configs)
  cfg = cfg or config
  if configs == ['default']:
    if cfg:
      raise ValueError(f'{base_name} has no configs (got {cfg!r})')
    return base_name, None
  cfg = cfg or configs[0]
  if cfg not in configs:
    raise ValueError(f'{base_name} has configs {configs}, not {cfg!r}')
  return base_name, cfg


def builder(name: str, src, out, *, workers: int = 1, runner: str | None = None,
            max_skip_fraction: float = 0.01, config: str | None = None, **source_options):
  """The tfds builder for `name` reading `src`, writing under `out` (not yet run)."""
  name, cfg = _split_name(name, config)
  if not os.path.exists(os.fspath(src)):
    raise FileNotFoundError(f'--src {src} does not exist (the {name} folder as it ships)')
  return BUILDERS[name](src=src, data_dir=os.fspath(out), config=cfg, workers=workers,
                        beam=runner is not None, max_skip_fraction=max_skip_fraction,
                        source_options=source_options)


def prepare(name: str, src, out, *, workers: int = 1, runner: str | None = None,
            max_skip_fraction: float = 0.01, beam_args=None, **builder_kwargs) -> Report:
  """Builds dataset `name` from its shipped layout in `src` into `out`; returns the Report.

  `runner=None` generates in this process (workers=1) or a process pool; a Beam
  runner name ('DirectRunner', 'DataflowRunner', 'FlinkRunner', 'SparkRunner') runs
  generation as a Beam pipeline (needs the `beam` extra), `beam_args` being that
  runner's own flags (e.g. ['--project=p', '--region=r', '--temp_location=gs://b/t']).
  An existing copy under `out` is rebuilt. Raises `SkipFractionExceeded` (carrying the
  report; nothing is left on disk) if more than `max_skip_fraction` of the inputs are
  skipped or nothing could be written. `builder_kwargs`: `config=` and the source's
  options (e.g. face_size=224, face_margin=0.25; see each source class).
  """
  b = builder(name, src, out, workers=workers, runner=runner,
              max_skip_fraction=max_skip_fraction, **builder_kwargs)
  if os.path.exists(b.data_dir):
    shutil.rmtree(b.data_dir)
  config = tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS)
  if runner is not None:
    try:
      from data_prep import beam as beam_lib  # pylint: disable=g-import-not-at-top
    except ModuleNotFoundError as e:
      raise ModuleNotFoundError(f"--runner {runner} needs Apache Beam: pip install -e '.[beam]' "
                                f'({e})') from None
    config.beam_options = beam_lib.pipeline_options(runner, workers, beam_args)
  b.download_and_prepare(download_config=config)
  return b.report


def dataset_dir(out, name: str, config: str | None = None) -> str:
  name, cfg = _split_name(name, config)
  parts = [os.fspath(out), name] + ([cfg] if cfg else []) + [str(base.VERSION)]
  return os.path.join(*parts)


def data_source(out, name: str, split: str, config: str | None = None):
  """Random-access reader of one prepared split (tfds ArrayRecord data source)."""
  return tfds.builder_from_directory(dataset_dir(out, name, config)).as_data_source(split=split)


def stored_report(out, name: str, config: str | None = None) -> dict:
  """The report a finished run stored in the dataset's metadata."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(dataset_dir(out, name, config), 'metadata.json')) as f:
    return json.load(f)['report']


__all__ = ['prepare', 'builder', 'data_source', 'dataset_dir', 'stored_report', 'Report',
           'SkipFractionExceeded', 'SOURCES', 'BUILDERS', 'common']
