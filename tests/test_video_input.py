"""Clip rows from the pipeline (data/clips.py): `frames` [B, T, S, S, 3] sampled uniformly
from the 16 stored and normalised like `image`, one augmentation draw per clip, the video
stage's spec and checks, and a still-image record in a clip stage named in the error."""

import numpy as np
import pytest

import video_util
from unifer_jax.data import augment, clips, pipeline, schema, sources, tfds_input
from unifer_jax.data import tokenizer as tok_lib


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('clips')
  clips_dir = video_util.clip_corpus(root)
  tok_lib.train_for_datasets(['synthetic_clips'], root / 'tok', data_dir=str(clips_dir),
                             vocab_size=512)
  return dict(root=root, clips=clips_dir, tok=root / 'tok')


def _cfg(corpus, **kw):
  cfg = pipeline.default_input_config()
  cfg.update(dict(name='synthetic_clips', data_dir=str(corpus['clips']), tokenizer=str(corpus['tok']),
                  frames=4, seq_len=96, tasks=['basic'], task_weights=[]))
  cfg.update(kw)
  return cfg


def test_instruct_rows_of_clips(corpus):
  pipe = pipeline.Pipeline(_cfg(corpus), 'instruct', batch_size=3, image_size=32, train=False,
                           shard=(0, 1))
  batch = next(pipe)
  assert batch['frames'].shape == (3, 4, 32, 32, 3) and batch['frames'].dtype == np.float32
  assert 'image' not in batch and batch['tokens'].shape == (3, 96)
  assert set(pipe.batch_spec(3)) <= set(batch) and pipe.batch_spec(3)['frames'].shape == (3, 4, 32, 32, 3)
  src = sources.open_split('synthetic_clips', 'train', str(corpus['clips']))
  rec = src[int(batch['_index'][0])]
  assert len(rec['frames']) == schema.CLIP_FRAMES
  picks = schema.clip_indices(schema.CLIP_FRAMES, 4)
  assert picks == [2, 6, 10, 14]
  want = np.stack([augment.model_image(clips.decoded_frame(rec['frames'][i]), 32) for i in picks])
  np.testing.assert_array_equal(batch['frames'][0], want)
  assert (batch['loss_mask'].sum(1) > 0).all()   # answer tokens are targets


class _Reads(list):
  """A record's frames that note which ones a reader took (to decode)."""

  def __init__(self, frames):
    super().__init__(frames)
    self.read = []

  def __getitem__(self, i):
    self.read.append(i)
    return super().__getitem__(i)


def test_clip_records_decode_only_the_frames_read(corpus):
  # open_split leaves frames encoded; the pixels equal tfds' full decode of every frame.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = sources.dataset_dir('synthetic_clips', str(corpus['clips']))
  full = tfds.builder_from_directory(path).as_data_source(
      split='train', decoders={'image': tfds.decode.SkipDecoding()})   # the old reader
  src = sources.open_split('synthetic_clips', 'train', str(corpus['clips']))
  rec, old = src[3], full[3]
  assert all(isinstance(f, bytes) for f in rec['frames']) and len(rec['frames']) == 16
  assert rec.keys() == old.keys() and rec['image'] == old['image'] and rec['id'] == old['id']
  for f, g in zip(rec['frames'], old['frames']):
    assert clips.decoded_frame(f).dtype == np.uint8
    np.testing.assert_array_equal(clips.decoded_frame(f), g)
  aug = augment.settings(dict(crop_scale=(0.5, 0.9), flip=0.5, occlusion=0.5))
  for kw, rng in ((dict(), None), (dict(raw_pixels=True), None), (dict(augment=aug), 7)):
    maker = clips.ClipMaker(fmt='eval', image_size=32, frames=4, **kw)
    frames = _Reads(rec['frames'])
    got = maker(0, 3, dict(rec, frames=frames), rng and np.random.default_rng(rng))['frames']
    want = maker(0, 3, old, rng and np.random.default_rng(rng))['frames']
    np.testing.assert_array_equal(got, want)
    assert frames.read == [2, 6, 10, 14]   # 4 of the 16 stored frames were decoded


def test_one_augmentation_draw_per_clip(corpus):
  src = sources.open_split('synthetic_clips', 'train', str(corpus['clips']))
  rec = dict(src[0])
  rec['frames'] = [rec['frames'][5]] * schema.CLIP_FRAMES      # a static clip
  aug = augment.settings(dict(crop_scale=(0.5, 0.9), flip=0.5, occlusion=1.0))
  maker = clips.ClipMaker(fmt='eval', image_size=32, frames=4, augment=aug)
  outs = [maker(0, 0, rec, np.random.default_rng(s))['frames'] for s in range(4)]
  for f in outs:   # every frame got the same crop, flip, jitter and patch
    for t in range(1, 4):
      np.testing.assert_array_equal(f[t], f[0])
  assert not np.array_equal(outs[0][0], outs[1][0])              # draws differ per clip
  assert not np.array_equal(outs[0][0], augment.model_image(rec['frames'][0], 32))


def test_a_still_image_record_is_named(corpus, tmp_path):
  from data_prep import synthetic_faces as sf
  sf.prepare(tmp_path / 'faces', size=6, seed=0, image_size=32, workers=1, samples=False)
  src = sources.open_split('synthetic_faces', 'train', str(tmp_path / 'faces'))
  maker = clips.ClipMaker(fmt='eval', image_size=32, frames=4, datasets=('synthetic_faces',))
  with pytest.raises(ValueError, match=r"dataset 'synthetic_faces' record 2 \(id .*\) has no "
                                       r"key 'frames'"):
    maker(0, 2, src[2], None)
  cfg = _cfg(corpus, name='synthetic_faces', data_dir=str(tmp_path / 'faces'))
  pipe = pipeline.Pipeline(cfg, 'instruct', batch_size=2, image_size=32, train=True, shard=(0, 1))
  with pytest.raises(ValueError, match="dataset 'synthetic_faces' record .* no key 'frames'"):
    next(pipe)


def test_stage_input_spec_and_checks(corpus):
  instruct = dict(root=corpus['root'], workdir=corpus['root'] / 'none')
  config = video_util.video_config({**instruct, 'config': None}, corpus['clips'])
  config.input.tokenizer = str(corpus['tok'])
  model_cfg = config.model
  spec = tfds_input.global_batch_spec(config, model_cfg)
  assert spec['frames'].shape == (8, 4, 32, 32, 3) and 'image' not in spec
  cfg, fmt, size = tfds_input.stage_input(config, model_cfg)
  assert (cfg.frames, fmt, size) == (4, 'instruct', 32)
  config.input.frames = 8
  with pytest.raises(ValueError, match='config.input.frames=8 but model.video.frames=4'):
    tfds_input.stage_input(config, model_cfg)
  config.input.frames = 0
  config.input.cache = True
  with pytest.raises(ValueError, match='config.input.cache is set, but clip rows'):
    tfds_input.stage_input(config, model_cfg)
  config.input.cache = False
  del model_cfg['video']
  config.input.frames = 4
  with pytest.raises(ValueError, match='config.input.frames=4 but the model has no model.video'):
    tfds_input.stage_input(config, model_cfg)
