"""The synthetic_clips corpus: determinism, the onset/apex/offset envelope (in the plan and
in the pixels), the labels, blinks, and the tfds build read back through tfds and
unifer_jax.data.sources.open_split."""

import dataclasses
import io
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import commands, render, synthetic_clips as sc
from unifer_jax.data import clips, labels, schema, sources

T = schema.CLIP_FRAMES


def _decode(png: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(png)).convert('RGB'))


def _plans(n=300, **kw):
  return [sc.sample_plan(np.random.default_rng([7, i]), T, **kw) for i in range(n)]


def test_records_are_deterministic():
  a = sc.make_record(3, seed=1, split='train', image_size=48)
  b = sc.make_record(3, seed=1, split='train', image_size=48)
  for k in schema.FIELDS:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert a['frames'] == b['frames']
  other = [sc.make_record(3, seed=2, split='train', image_size=48),
           sc.make_record(4, seed=1, split='train', image_size=48),
           sc.make_record(3, seed=1, split='test', image_size=48)]
  assert all(o['frames'] != a['frames'] for o in other)
  with pytest.raises(ValueError, match='split'):
    sc.make_record(0, seed=0, split='dev')
  with pytest.raises(ValueError, match='frames must be >= 8'):
    sc.make_record(0, seed=0, split='train', frames=4)


def test_envelope_neutral_onset_apex_offset():
  for plan in _plans():
    env, p = plan.envelope, plan.apex_frame
    assert env[0] == 0 and env[-1] <= 0.1                       # starts neutral, ends near it
    assert env[p] == 1 == env.max() and T // 4 <= p < T - T // 4
    assert (np.diff(env[:p + 1]) >= 0).all() and (np.diff(env[p:]) <= 0).all()
    amps = [max(plan.frame_aus(k).values(), default=0) for k in range(T)]
    assert amps[p] == max(amps) and amps[0] == 0 and amps[-1] <= 0.1 * amps[p] + 1e-9
  # The middle frame (a single-image model's view) is not always the apex.
  assert np.mean([pl.apex_frame != T // 2 for pl in _plans()]) > 0.7


def test_envelope_in_pixels():
  # Motion and blinks off: frame 0 is the neutral face exactly, and the apex frame
  # differs from it the most.
  plan = sc.sample_plan(np.random.default_rng(0), T, category='surprise', apex_intensity=0.6)
  look = dataclasses.replace(plan.looks[0], noise=0.0)
  still = dataclasses.replace(plan, looks=(look,) * T, blink=np.zeros(T))
  frames, _ = sc.render_frames(still, 64)
  np.testing.assert_array_equal(frames[0], sc.render_frames(
      dataclasses.replace(still, envelope=np.zeros(T)), 64)[0][0])
  change = [np.abs(f.astype(int) - frames[0]).mean() for f in frames]
  assert int(np.argmax(change)) in np.flatnonzero(still.envelope == 1)
  assert change[still.apex_frame] > 5 * change[-1]


def test_labels_are_the_apex():
  recs = [sc.make_record(i, seed=0, split='train', image_size=40, frames=8) for i in range(24)]
  for r in recs:
    nz = json.loads(r['nuisance'])
    assert len(r['frames']) == 8 and r['image'] == r['frames'][4]
    assert _decode(r['frames'][0]).shape == (40, 40, 3)
    assert (r['expression'] >= 0) != (r['compound'] >= 0)
    np.testing.assert_allclose(r['label_dist'].sum(), 1, atol=1e-6)
    active = r['aus'][r['aus'] > 0]
    np.testing.assert_allclose(r['intensity'], active.mean() if active.size else 0, atol=1e-5)
    assert nz['low_intensity'] == (active.size > 0 and r['intensity'] < sc.LOW_INTENSITY)
    assert len(nz['envelope']) == len(nz['blink']) == len(nz['yaw']) == 8
    assert r['caption'] and r['rationale'] and r['source'] == 'synthetic_clips'
    for i in np.flatnonzero(r['aus'] > 0):
      au = list(labels.AUS)[i]
      assert (f'AU{au} ' in r['rationale']) == (au not in nz['hidden_aus'])
  # The head moves: yaw drifts within a clip.
  assert np.mean([np.ptp(json.loads(r['nuisance'])['yaw']) > 0.5 for r in recs]) > 0.7
  # Apex intensities: ~40 % low (the clips where time matters), the rest up to 1.
  apex = np.array([pl.apex.intensity for pl in _plans(400) if pl.apex.aus])
  assert 0.3 < np.mean(apex < sc.LOW_INTENSITY) < 0.5 and apex.min() >= 0.1 and apex.max() > 0.9
  forced = sc.sample_plan(np.random.default_rng(1), T, category='happiness', apex_intensity=0.2)
  assert labels.BASIC[forced.apex.basic] == 'happiness'
  np.testing.assert_allclose(forced.apex.intensity, 0.2, atol=2e-3)


def test_blink_frames():
  # render: a closed lid hides the eye white and the iris, and changes nothing else.
  look = render.Look()
  open_, shut = render.render({}, look, size=160), render.render({}, look, size=160, blink=1.0)
  eye_rows = render.eye_centres(look, 160)[:, 1]
  band = slice(int(eye_rows.min()) - 12, int(eye_rows.max()) + 12)
  white = lambda x: (x[band].min(-1) > 215).sum()
  dark = lambda x: (x[band].max(-1) < 40).sum()           # the pupils
  assert white(open_) > 30 and white(shut) == 0 and dark(open_) > 10 and dark(shut) == 0
  outside = np.ones(160, bool)
  outside[band] = False
  np.testing.assert_array_equal(open_[outside], shut[outside])
  with pytest.raises(ValueError, match='blink'):
    render.render({}, look, blink=1.5)
  # A clip: blink frames are the frames that change when the blinks are taken out.
  rng = np.random.default_rng(0)
  plan = next(p for p in (sc.sample_plan(rng, T) for _ in range(50))
              if p.blink.max() > 0.85 and p.looks[0].occluder == 'none')
  with_, _ = sc.render_frames(plan, 64)
  without, _ = sc.render_frames(dataclasses.replace(plan, blink=np.zeros(T)), 64)
  changed = [not np.array_equal(a, b) for a, b in zip(with_, without)]
  assert changed == [bool(c > 0) for c in plan.blink]
  counts = [int((p.blink >= 0.85).sum()) for p in _plans()]
  assert 0.5 < np.mean([c > 0 for c in counts]) < 0.8 and max(counts) <= 2


def test_prepare_read_back(tmp_path):
  out = tmp_path / 'data'
  counts = sc.prepare(out, size=10, seed=3, image_size=40, frames=8, workers=1)
  assert {k: counts[k] for k in ('train', 'validation', 'test')} == {
      'train': 8, 'validation': 1, 'test': 1}
  assert counts['basic'] + counts['compound'] == 10
  assert os.path.getsize(out / 'clip_samples.png') > 10_000
  want = sc.make_record(0, seed=3, split='train', image_size=40, frames=8)
  # tfds (registered by name when the module is imported) decodes every frame.
  rec = tfds.data_source('synthetic_clips', data_dir=str(out), split='train')[0]
  assert np.stack(rec['frames']).shape == (8, 40, 40, 3)
  np.testing.assert_array_equal(rec['frames'][5], _decode(want['frames'][5]))
  # The training readers: image and frames as their encoded bytes (a reader decodes the
  # frames it uses), the pixels tfds' decode gives.
  src = sources.open_split('synthetic_clips', 'train', str(out))
  assert len(src) == 8 and sources.splits('synthetic_clips', str(out))['test'] == 1
  r = src[0]
  assert r['image'] == want['image'] and r['id'] == b'train/0000000'
  assert r['frames'] == want['frames']
  np.testing.assert_array_equal(_decode(r['image']), clips.decoded_frame(r['frames'][4]))
  np.testing.assert_array_equal(clips.decoded_frame(r['frames'][5]), rec['frames'][5])
  np.testing.assert_allclose(r['aus'], want['aus'])
  assert json.loads(r['nuisance']) == json.loads(want['nuisance'])
  # Same parameters: reused, not rebuilt; others: rebuilt.
  stamp = os.path.getmtime(os.path.join(sc.dataset_dir(out), 'dataset_info.json'))
  assert sc.prepare(out, size=10, seed=3, image_size=40, frames=8, samples=False) == counts
  assert os.path.getmtime(os.path.join(sc.dataset_dir(out), 'dataset_info.json')) == stamp
  sc.prepare(out, size=10, seed=4, image_size=40, frames=8, workers=1, samples=False)
  again = sc.data_source(out, 'train')[0]
  assert not np.array_equal(np.stack(again['frames']), np.stack(rec['frames']))
  assert json.load(open(os.path.join(sc.dataset_dir(out), 'metadata.json')))['params']['seed'] == 4


def test_cli_prep(tmp_path, capsys):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser()
  commands.add_parser(parser.add_subparsers(dest='command'))
  args = parser.parse_args(['prep', 'synthetic_clips', '--out', str(tmp_path), '--size', '3',
                            '--image_size', '32', '--frames', '8', '--workers', '1',
                            '--compound_fraction', '0'])
  assert commands.run(args) == 0
  assert "'train': 1" in capsys.readouterr().out
  params = json.load(open(os.path.join(sc.dataset_dir(tmp_path), 'metadata.json')))['params']
  assert params['compound_fraction'] == 0
  assert sources.splits('synthetic_clips', str(tmp_path)) == {'train': 1, 'validation': 1,
                                                             'test': 1}
  with pytest.raises(ValueError, match='low_fraction'):
    sc.SyntheticClips(data_dir=str(tmp_path), size=3, low_fraction=2)
