"""Captions that identify the face (data_prep/look_words.py + facs.caption) and
instance-level retrieval (evaluators/alignment.retrieval_recalls)."""

import dataclasses
import json
import re

import numpy as np
import pytest

from data_prep import facs, look_words, render, synthetic_faces as sf
from unifer_jax import config_lib
from unifer_jax.data import faces
from unifer_jax.data import tokenizer as tokenizer_lib
from unifer_jax.evaluators import alignment

_LIGHT = re.compile(r'(?:light|lit softly|lit strongly) from (the right|the left|below|above)')


def _options(table, **fmt):
  return [re.sub(r'\ba ([aeiou])', r'an \1', o.format(**fmt).lower()) for o in table]


def _look(nz: dict) -> render.Look:
  fields = {f.name for f in dataclasses.fields(render.Look)}
  kw = {k: (tuple(tuple(c) for c in v) if k == 'background' else
            tuple(v) if isinstance(v, list) else v) for k, v in nz.items() if k in fields}
  return render.Look(**kw)


def test_yaw_and_light_words_follow_the_rendered_image():
  """The conventions the words rest on, read off the renderer: yaw > 0 moves the nose
  (near the camera) to the image right; light from a side brightens that side of the
  stored (eye-line aligned) image."""
  for yaw in (-20.0, -8.0, 8.0, 20.0):
    look = render.Look(yaw=yaw)
    nose, flat = render.project([(0.0, 0.0)], look), render.project([(0.0, 0.0)], look, flat=True)
    assert np.sign(nose[0, 0] - flat[0, 0]) == np.sign(yaw)
    assert look_words.side(yaw) == ('right' if yaw > 0 else 'left')
  rng = np.random.default_rng(0)
  for _ in range(8):
    look = dataclasses.replace(render.sample_look(rng), light=0.4, noise=0.0, occluder='none')
    eyes = render.eye_centres(look, 112)
    lit, flat = (faces.align(render.render({}, lk, size=112), *eyes, size=112,
                             eyes_at=render.ALIGNED_EYES).astype(np.float32)
                 for lk in (look, dataclasses.replace(look, light=0.0)))
    gain = ((lit + 1) / (flat + 1)).mean(-1)[20:92, 20:92]
    h = gain.shape[0] // 2
    brighter = {'the right': gain[:, h:].mean() - gain[:, :h].mean(),
                'the left': gain[:, :h].mean() - gain[:, h:].mean(),
                'below': gain[h:].mean() - gain[:h].mean(),
                'above': gain[:h].mean() - gain[h:].mean()}
    assert max(brighter, key=brighter.get) == look_words.light_direction(look, aligned=True)


def test_colour_names():
  assert look_words.colour_name((200, 30, 30)) == 'red'
  assert look_words.colour_name((30, 60, 210)) == 'blue'
  assert look_words.colour_name((20, 90, 20)) == 'dark green'
  assert look_words.colour_name((128, 128, 128)) == 'grey'
  assert look_words.colour_name((220, 170, 240)) == 'pale purple'
  assert look_words.colour_name((235, 235, 235)) == 'light grey'


def test_captions_of_fixed_records_match_their_nuisance():
  """Every attribute a caption names is the record's own: pose side and degree, light
  direction, skin tone, hair, background colour, glasses, occluder -- and a face turned
  one way is never captioned as turned the other."""
  sides_seen = set()
  for i in range(150):
    rec = sf.make_record(i, seed=0, split='test', image_size=48)
    nz = json.loads(rec['nuisance'])
    look = _look(nz)
    cap = rec['caption'].lower()
    # Light: the one phrase naming a direction, and the right one.
    lights = _LIGHT.findall(cap)
    if look.light < look_words.FLAT_LIGHT:
      assert not lights and any(o in cap for o in _options(look_words._LIGHT_FLAT)), cap
    else:
      assert lights == [look_words.light_direction(look, True)], (cap, nz['light_angle'])
    # Pose: with the light phrase removed, 'left' / 'right' can only be the head turn.
    rest = _LIGHT.sub('', cap)
    words = set(re.findall(r'\b(left|right)\b', rest))
    yaw = nz['yaw']
    if abs(yaw) < look_words.FRONTAL_YAW:
      assert not words and any(o in cap for o in _options(look_words._POSE_FRONTAL)), cap
    else:
      side = 'right' if yaw > 0 else 'left'
      assert words == {side}, (yaw, cap)
      slight = abs(yaw) < look_words.TURNED_YAW
      table = look_words._POSE_SLIGHT if slight else look_words._POSE_TURNED
      assert any(o in cap for o in _options(table, side=side)), (yaw, cap)
      sides_seen.add(side)
    # Skin: the named tone is the palette entry the renderer jittered (by <= 8 per channel).
    skin = next(n for n in sorted(look_words.SKIN_NAMES, key=len, reverse=True)
                if f'{n} skin' in cap or f'{n}-skinned' in cap)
    tone = render.SKIN_TONES[look_words.SKIN_NAMES.index(skin)]
    assert np.abs(np.subtract(nz['skin'], tone)).max() <= 8, (skin, nz['skin'])
    # Hair: style and colour (the renderer jitters the colour by <= 10 per channel).
    if nz['hair'] == 'none':
      assert any(o in cap for o in _options(look_words._HAIR['none'])), cap
    else:
      m = re.search(rf"{nz['hair']} ([a-z ]+?) hair\b|([a-z ]+?) hair, {nz['hair']}", cap)
      assert m, (nz['hair'], cap)
      name = (m.group(1) or m.group(2)).split(', ')[-1].strip()
      colour = render.HAIR_COLORS[look_words.HAIR_NAMES.index(name)]
      assert np.abs(np.subtract(nz['hair_color'], colour)).max() <= 10, (name, nz['hair_color'])
    bg = look_words.colour_name(np.mean(nz['background'], axis=0))
    assert any(o in cap for o in _options(look_words._BACKGROUND, c=bg)), (bg, cap)
    assert ('glasses' in cap) == nz['glasses'], cap
    assert ('mask' in cap) == (nz['occluder'] == 'mask'), cap
    assert ('hand' in cap) == (nz['occluder'] == 'hand'), cap
    assert ('grain' in cap or 'noisy' in cap) == (nz['noise'] >= look_words.GRAINY_NOISE), cap
  assert sides_seen == {'left', 'right'}


def test_captions_are_deterministic_and_tell_faces_apart():
  a = [sf.make_record(i, seed=1, split='test', image_size=48)['caption'] for i in range(300)]
  b = [sf.make_record(i, seed=1, split='test', image_size=48)['caption'] for i in range(300)]
  assert a == b
  assert len(set(a)) == len(a)          # no two of 300 faces share a caption
  look = render.sample_look(np.random.default_rng(3))
  variants = {tuple(look_words.phrases(look, np.random.default_rng(s)).values())
              for s in range(20)}
  assert len(variants) > 5              # several phrasings of one look
  # The old call (no look) still names occluder and glasses alone.
  e = facs.sample_expression(np.random.default_rng(0), category='happiness')
  assert 'glasses' in facs.caption(e, np.random.default_rng(0), glasses=True)


def test_align_text_len_holds_every_caption(tmp_path):
  """A BPE trained on 150 records (fewer merges than the demo's 16000: longer ids, so a
  conservative count) keeps every caption of 400 others within the align text_len."""
  train = [sf.make_record(i, seed=0, split='train', image_size=32) for i in range(150)]
  tok = tokenizer_lib.load(tokenizer_lib.train(tokenizer_lib.corpus_texts(train),
                                               tmp_path / 'tok', 2048))
  held = [sf.make_record(i, seed=0, split='test', image_size=32)['caption'] for i in range(400)]
  longest = max(len(tok.encode(c)) + 2 for c in held)   # + [CLS] and EOS
  text_len = config_lib.load('configs/align.py:demo').input.text_len
  assert longest <= text_len, (longest, text_len)


def test_retrieval_recalls_on_a_hand_made_similarity_matrix():
  # 4 faces: 0 and 1 share a label, 2 and 3 are others; row = image, column = caption.
  sim = np.array([[0.9, 0.95, 0.1, 0.0],    # own caption 2nd, the label-mate's 1st
                  [0.2, 0.8, 0.1, 0.3],     # own first
                  [0.1, 0.2, 0.3, 0.6],     # own 2nd, behind another label's
                  [0.5, 0.4, 0.25, 0.2]])   # own last
  expression, compound = np.array([1, 1, 2, 3]), np.array([-1, -1, -1, -1])
  r = alignment.retrieval_recalls(sim, (1, 2, 4), expression, compound)
  assert r['i2t_r1'] == 0.25 and r['i2t_r2'] == 0.75 and r['i2t_r4'] == 1.0
  assert r['label_i2t_r1'] == 0.5 and r['label_i2t_r2'] == 0.75
  # Columns: caption 0's best image is 0 (.9); 1's is 0 (.95, its label-mate); 2's is
  # 2 (.3); 3's is 2 (.6, another label).
  assert r['t2i_r1'] == 0.5 and r['label_t2i_r1'] == 0.75
  assert alignment.retrieval_recalls(sim, (1,)) == {'i2t_r1': 0.25, 't2i_r1': 0.5}
  with pytest.raises(ValueError, match='square'):
    alignment.retrieval_recalls(sim[:3])
