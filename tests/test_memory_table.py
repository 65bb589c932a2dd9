"""config.input.cache (data/memory_table.py): the decoded-once table gives the batches the
per-record pipeline gives -- over a mixture, per process shard, across a resume -- and
refuses inputs whose examples change between epochs."""

import json

import numpy as np
import pytest

from data_prep import synthetic_faces as sf
from unifer_jax.data import augment, pipeline, sources

SIZE = 32


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  sf.prepare(root / 'a', size=120, seed=1, image_size=64, workers=1, samples=False)
  sf.prepare(root / 'b', size=40, seed=2, image_size=64, workers=1, samples=False)
  return dict(a=sf.dataset_dir(root / 'a'), b=sf.dataset_dir(root / 'b'))


def make(corpus, *, cache, shard=(0, 1), batch=8, **kw):
  cfg = pipeline.default_input_config()
  cfg.update(dict(name=corpus['a'], cache=cache, threads=2,
                  mixture=[[corpus['a'], 3.0], [corpus['b'], 1.0]]))
  cfg.augment.enabled = False
  cfg.update(kw)
  return pipeline.Pipeline(cfg, 'eval', batch_size=batch, image_size=SIZE, shard=shard,
                           tokenizers=(None, None))


def assert_same(want, got):
  assert want.keys() == got.keys()
  for k in want:
    assert want[k].dtype == got[k].dtype, k
    np.testing.assert_array_equal(want[k], got[k], err_msg=k)


@pytest.mark.parametrize('shard', [(0, 1), (1, 2)])
def test_cached_batches_equal_the_decoded_ones(corpus, shard):
  plain, cached = make(corpus, cache=False, shard=shard), make(corpus, cache=True, shard=shard)
  seen = []
  for _ in range(40):        # several epochs of both sources' shards
    want, got = next(plain), next(cached)
    assert_same(want, got)
    seen.append(got['_source'])
  assert set(np.concatenate(seen)) == {0, 1}
  assert np.all(got['_index'] % shard[1] == shard[0])
  # Not vacuous: batches differ from one another.
  assert not np.array_equal(want['image'], next(plain)['image'])


def test_cached_pipeline_resumes_at_the_exact_next_batch(corpus):
  a = make(corpus, cache=True)
  for _ in range(5):
    next(a)
  state = json.loads(json.dumps(a.get_state()))
  want = [next(a) for _ in range(3)]
  b = make(corpus, cache=True)
  b.set_state(state)
  for w in want:
    assert_same(w, next(b))
  assert b.get_state()['position'] == 8


def test_normalise_a_batch_equals_one_image_at_a_time(corpus):
  src = sources.open_split(corpus['a'], 'train', '')
  images = [src[i]['image'] for i in range(4)]
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  batch = augment.normalise(np.stack([augment.stored_pixels(x, SIZE) for x in images]),
                            mean, std)
  singles = np.stack([augment.model_image(x, SIZE, mean, std) for x in images])
  assert batch.dtype == np.float32 and batch.shape == (4, SIZE, SIZE, 3)
  np.testing.assert_array_equal(batch, singles)


def test_cache_refuses_examples_that_change_between_epochs(corpus):
  with pytest.raises(ValueError, match=r'augment.enabled=False'):
    make(corpus, cache=True, augment=dict(enabled=True))
  with pytest.raises(ValueError, match=r'workers=0'):
    make(corpus, cache=True, workers=1)
  cfg = pipeline.default_input_config()
  cfg.update(dict(name=corpus['a'], cache=True))
  cfg.augment.enabled = False
  with pytest.raises(ValueError, match=r"format 'generate'"):
    pipeline.Pipeline(cfg, 'generate', batch_size=8, image_size=SIZE, shard=(0, 1))
