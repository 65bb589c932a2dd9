"""The video stage end to end at tiny dims: warm-started from an instruct workdir (the
clip weights fresh and zero), an exact resume, and the video evaluator on real clip
records (the clip model's answers and the instruct model's frame vote)."""

import json
import shutil

import numpy as np
import pytest

import video_util
import workdir_util
from unifer_jax.evaluators import model_io, registry
from unifer_jax.evaluators import video as video_eval
from unifer_jax.train import loop


def _losses(workdir):
  return {r['step']: r['loss'] for r in map(json.loads,
                                            (workdir / 'metrics.jsonl').read_text().splitlines())}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('video')
  instruct = workdir_util.instruct_workdir(root, lora_rank=0)
  clips = video_util.clip_corpus(root)
  config = video_util.video_config(instruct, clips, '--config.total_steps=4',
                                   '--config.checkpoint.every_steps=2', '--config.checkpoint.keep=3')
  loop.train(config, root / 'video')
  return dict(root=root, instruct=instruct, clips=clips, config=config, workdir=root / 'video')


def test_warm_start_and_exact_resume(trained, capsys):
  del capsys
  w = trained['workdir']
  reference = _losses(w)
  assert sorted(reference) == [1, 2, 3, 4] and all(np.isfinite(list(reference.values())))
  last = json.loads((w / 'metrics.jsonl').read_text().splitlines()[-1])
  assert last['img_per_s'] > 0   # frames count as images (B * T ViT passes a step)
  # A run cut after step 4's log but before its save: resume from step 2.
  resumed = trained['root'] / 'resumed'
  shutil.copytree(w, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '4')
  lines = (resumed / 'metrics.jsonl').read_text().splitlines()
  (resumed / 'metrics.jsonl').write_text('\n'.join(
      l for l in lines if json.loads(l)['step'] <= 2) + '\n')
  loop.train(trained['config'], resumed)
  got = _losses(resumed)
  for s in (3, 4):
    assert got[s] == reference[s], (s, got[s], reference[s])
  # The clip weights started at zero (fresh) and trained; the rest came from instruct.
  model = model_io.load(w, 4)
  embed = np.asarray(model.params['video']['temporal_embed'])
  assert embed.shape == (4, 32) and 0 < np.abs(embed).max() < 0.1


def test_evaluator_on_real_clips(trained, tmp_path):
  model = model_io.load(trained['workdir'])
  evs = registry.build({'video': dict(type='video', dataset=dict(split='test'), max_items=50,
                                      batch_size=4)})
  r = registry.run(evs, model, tmp_path)['video']
  assert 'error' not in r, r
  n = r['video_n']
  assert n == 3 and r['video_low_intensity_n'] <= n
  for k in ('video_clip_acc', 'video_frame_vote_acc', 'video_clip_parsed'):
    assert 0.0 <= r[k] <= 1.0 and r[k] * n == pytest.approx(round(r[k] * n)), (k, r[k])
  rows = json.loads((tmp_path / 'video_answers.json').read_text())
  assert len(rows) == n and {'answer', 'said', 'frame_vote', 'true', 'low_intensity'} <= set(rows[0])
  acc = np.mean([row['said'] == row['true'] for row in rows])
  assert acc == pytest.approx(r['video_clip_acc'])
  vote = np.mean([row['frame_vote'] == row['true'] for row in rows])
  assert vote == pytest.approx(r['video_frame_vote_acc'])
  # An image model is refused by name.
  frame_model = model_io.load(trained['instruct']['workdir'])
  bad = registry.run(evs, frame_model, None)['video']
  assert 'no model.video' in bad['error']


def test_the_demo_video_part(trained, tmp_path):
  """`unifer demo --video` after instruct: clips, the stage, the report keys and table."""
  from unifer_jax import video_demo
  w = tmp_path / 'demo'
  w.mkdir()
  (w / 'instruct').symlink_to(trained['instruct']['workdir'])
  (w / 'tokenizer').symlink_to(trained['instruct']['root'] / 'tok')
  report = video_demo.run_video(w, [*video_util.TINY_OVERRIDES, '--config.total_steps=2'], 'tiny',
                                size=30, image_size=32)
  assert (w / 'video' / 'checkpoints' / '2').is_dir() and (w / 'clips').is_dir()
  assert report['video_n'] == 3 and report['video_low_intensity_n'] <= 3
  for k in ('video_clip_acc', 'video_frame_vote_acc'):
    assert 0 <= report[k] <= 1 and report[k] * 3 == pytest.approx(round(report[k] * 3))
  table = video_demo.markdown(report)
  assert f'| clip model (configs/video.py) | {report["video_clip_acc"]:.3f} |' in table


def test_majority_vote():
  assert video_eval.majority(['fear', 'unknown', 'anger', 'anger']) == 'anger'
  assert video_eval.majority(['fear', 'anger', 'anger', 'fear']) == 'fear'   # tie: first named
  assert video_eval.majority(['unknown'] * 3) == 'unknown'
