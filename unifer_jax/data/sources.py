"""Random-access readers of prepared datasets (TFDS ArrayRecord, read without TensorFlow).

A dataset is named either by its tfds name under a data_dir (``synthetic_faces`` ->
``DATA_DIR/synthetic_faces/<newest version>/``) or by the path of a version directory
(the one holding ``dataset_info.json``). Images come back as their encoded bytes (the
pipeline decodes, crops and resizes in one step; tfds' own decode is ~2x slower), text
fields as ``bytes``, and a clip record's ``frames`` as a list of its T encoded frames: a
reader decodes only the frames it uses (8 of 16 for a clip model, none for an image
stage reading ``image``; clips.decoded_frame). Per 64 px synthetic_clips record (2-core
CPU, 2026-12-08), against tfds decoding all 16 frames: src[i] 0.17 ms (was 2.27), + the
image an image stage reads 0.41 ms (2.86), + a T=8 clip (ClipMaker, eval) 2.04 ms (3.19).
"""

from __future__ import annotations

import functools
import os


def dataset_dir(name: str, data_dir: str = '') -> str:
  """The version directory of dataset `name` (a tfds name under data_dir, or a path)."""
  if os.path.isfile(os.path.join(name, 'dataset_info.json')):
    return name
  root = os.path.join(data_dir, name) if data_dir else name
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f'dataset {name!r}: no directory {root} (config.input.data_dir={data_dir!r}); '
        f'prepare it with `unifer prep {name} --out {data_dir or "DIR"}`')
  if os.path.isfile(os.path.join(root, 'dataset_info.json')):
    return root
  versions = [v for v in os.listdir(root)
              if os.path.isfile(os.path.join(root, v, 'dataset_info.json'))]
  if not versions:
    raise FileNotFoundError(f'dataset {name!r}: {root} holds no prepared version '
                            f'(no */dataset_info.json); was `unifer prep` interrupted?')
  newest = max(versions, key=lambda v: tuple(int(p) if p.isdigit() else -1
                                             for p in v.split('.')))
  return os.path.join(root, newest)


class _EncodedFrames:
  """tfds decoder that leaves a Sequence(Image) -- a clip's ``frames`` -- as its encoded
  images. ``tfds.decode.SkipDecoding`` fails there: tfds (4.9.10) decodes a sequence
  with ``decode_batch_example_np`` on all T at once, which SkipDecoding lacks."""

  def setup(self, feature):
    del feature

  def decode_example_np(self, data):
    return data

  def decode_batch_example_np(self, data):
    return [bytes(x) for x in data]   # an object array of the T encoded frames


@functools.lru_cache(maxsize=32)
def _builder(path: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  return tfds.builder_from_directory(path)


def splits(name: str, data_dir: str = '') -> dict[str, int]:
  """{split: number of records} of a prepared dataset."""
  info = _builder(dataset_dir(name, data_dir)).info
  return {k: v.num_examples for k, v in info.splits.items()}


def open_split(name: str, split: str, data_dir: str = ''):
  """A random-access source of one split: ``len(src)``, ``src[i] -> dict`` (image bytes;
  a clip's ``frames``: a list of encoded frames)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = dataset_dir(name, data_dir)
  builder = _builder(path)
  if split not in builder.info.splits:
    raise ValueError(f'dataset {name!r} ({path}) has no split {split!r}; it has '
                     f'{sorted(builder.info.splits)}')
  decoders = {'image': tfds.decode.SkipDecoding()}
  if 'frames' in builder.info.features:
    decoders['frames'] = _EncodedFrames()
  return builder.as_data_source(split=split, decoders=decoders)
