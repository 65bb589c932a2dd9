"""Q-Former: entry-point shapes, the three BLIP-2 attention masks (checked by perturbing
inputs), scan == unrolled, cross-attention placement, logical axes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unifer_jax import sharding
from unifer_jax.models import qformer as qf

import model_util

B, Q, T, S, V = 2, 3, 6, 5, 40


def tiny_cfg(**kw):
  base = dict(hidden=16, depth=4, heads=2, mlp_dim=24, num_queries=Q, cross_attention_freq=2,
              encoder_width=12, vocab_size=V, max_position=16, type_vocab_size=0)
  return qf.default_config(**{**base, **kw})


def make(cfg, seed=0):
  # Random weights without running the initialisers (nothing here tests them): ~0.2 s
  # against ~1.5 s of eager initialisation per model.
  return model_util.random_module(lambda: qf.QFormer(cfg, rngs=nnx.Rngs(0)), seed=seed)


# Entry points run jitted: eager calls would re-trace the layer scan on every call.
@nnx.jit(static_argnames='name')
def run(model, *args, name):
  return getattr(model, name)(*args)


@pytest.fixture(scope='module')
def model():
  return make(tiny_cfg())


def inputs(seed=1):
  r = np.random.RandomState(seed)
  image = jnp.asarray(r.randn(B, S, 12), jnp.float32)
  ids = jnp.asarray(r.randint(1, V, (B, T)))
  mask = jnp.asarray(np.array([[1] * T, [1] * 4 + [0] * (T - 4)]))
  return image, ids, mask


def params_of(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def changed(a, b, axis_keep):
  """Per position along axis 1: did anything change (beyond float noise)?"""
  diff = np.abs(np.asarray(a) - np.asarray(b))
  return diff.max(axis=tuple(i for i in range(diff.ndim) if i != axis_keep)) > 1e-6


def test_entry_point_shapes():
  model = make(tiny_cfg(cross_attention_freq=1))
  image, ids, mask = inputs()
  shapes = jax.eval_shape(lambda: (
      model(jnp.ones((B, 7, 16)), image), model.encode_queries(image),
      model.encode_text(ids, mask), model.match(image, ids, mask),
      model.caption_logits(image, ids, mask, jnp.ones((B, S)))))
  assert [s.shape for s in shapes] == [(B, 7, 16), (B, Q, 16), (B, T, 16), (B, Q, 16),
                                       (B, T, V)]


def test_bert_is_called_like_bertmodel():
  cfg = tiny_cfg(num_queries=0, cross_attention_freq=0, type_vocab_size=2, lm_head=False,
                 pooler=True)
  bert = qf.Bert(cfg, rngs=nnx.Rngs(0))
  _, ids, mask = inputs()
  out = run(bert, ids, mask, name='__call__')
  assert out.shape == (B, T, 16)
  np.testing.assert_array_equal(out, run(bert, ids, mask, jnp.zeros_like(ids), name='encode_text'))
  assert not np.allclose(out, run(bert, ids, mask, jnp.ones_like(ids), name='__call__'))
  assert bert.pool(out).shape == (B, 16)
  tree = params_of(bert)
  assert 'query_mlp' not in tree['blocks']['layers'][0]
  assert 'cross_attention' not in tree['blocks']['layers'][0]


def test_multimodal_causal_mask_by_hand():
  valid = jnp.array([[1, 1, 1, 1, 0]], bool)  # 2 queries, 3 text tokens, the last padded
  expected = np.array([[1, 1, 0, 0, 0],   # queries see queries only
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],   # text 0 sees queries + itself
                       [1, 1, 1, 1, 0],   # text 1 sees queries + text 0..1
                       [1, 1, 1, 1, 0]],  # text 2 (padding) never seen by anyone
                      bool)
  np.testing.assert_array_equal(qf.multimodal_causal_mask(2, valid)[0, 0], expected)


def test_itc_text_pass_is_bidirectional_and_blind_to_queries(model):
  image, ids, mask = inputs()
  text = lambda m, i: run(m, i, mask, name='encode_text')
  base = text(model, ids)
  # Every valid position sees a perturbed valid token (bidirectional).
  bumped = text(model, ids.at[:, 1].set((ids[:, 1] + 1) % V))
  assert changed(base, bumped, 1)[[0, 2, 3]].all()
  # A padded token is seen by nobody: valid positions of row 1 unchanged.
  padded = text(model, ids.at[1, 5].set((ids[1, 5] + 1) % V))
  np.testing.assert_allclose(padded[1, :4], base[1, :4], atol=1e-6)
  # Queries do not take part: new query tokens leave the text pass untouched.
  other = nnx.clone(model)
  other.query_tokens[...] = other.query_tokens[...] + 1.0
  np.testing.assert_array_equal(text(other, ids), base)


def test_itm_queries_see_text_and_image(model):
  image, ids, mask = inputs()
  match = lambda img, i: run(model, img, i, mask, name='match')
  base = match(image, ids)
  bumped = match(image, ids.at[:, 3].set((ids[:, 3] + 1) % V))
  assert changed(base, bumped, 1).all()  # every query sees text token 3
  padded = match(image, ids.at[1, 5].set((ids[1, 5] + 1) % V))
  np.testing.assert_allclose(padded, base, atol=1e-6)  # ... but never a padded one
  assert changed(base, match(image + 1.0, ids), 1).all()
  # The queries-only pass (ITC) differs: there the queries do not see the text.
  assert not np.allclose(base, run(model, image, name='encode_queries'), atol=1e-4)


@pytest.mark.parametrize('t', [0, 2, 5])
def test_itg_text_is_causal_and_queries_do_not_see_text(model, t):
  image, ids, mask = inputs()
  mask = jnp.ones_like(mask)
  caption = lambda img, i: run(model, img, i, mask, name='caption_logits')
  base = caption(image, ids)
  pos = changed(base, caption(image, ids.at[:, t].set((ids[:, t] + 1) % V)), 1)
  # Positions before t are untouched -- with depth 4 this also means the queries never
  # saw token t (they feed every text position in the next layer).
  assert not pos[:t].any() and pos[t:].all(), pos
  assert changed(base, caption(image + 1.0, ids), 1).all()  # text sees the queries


def test_itg_query_states_equal_the_queries_only_pass(model):
  """LAVIS runs ITG as two passes (queries first, text on cached query keys/values); one
  pass under the multimodal mask must give the queries exactly the queries-only states."""
  image, ids, mask = inputs()

  @nnx.jit
  def itg_query_states(m):
    x, valid = m._queries_and_text(m._queries(B), ids, mask)
    return m._encode(x, qf.multimodal_causal_mask(Q, valid), Q, image, None)[:, :Q]

  np.testing.assert_allclose(itg_query_states(model), run(model, image, name='encode_queries'),
                             atol=1e-5)


def test_instruction_aware_prefix_is_the_itm_pass():
  """InstructBLIP: the queries see the instruction (every valid token, never padding)
  through the same bidirectional pass as ITM; without instruction ids, the plain pass."""
  model = make(tiny_cfg(instruction_aware=True))
  image, ids, mask = inputs()
  prefix = lambda i: run(model, image, None, i, mask, name='encode_queries')
  base = prefix(ids)
  assert base.shape == (B, Q, 16)
  np.testing.assert_array_equal(base, run(model, image, ids, mask, name='match'))
  assert changed(base, prefix(ids.at[:, 3].set((ids[:, 3] + 1) % V)), 1).all()
  np.testing.assert_allclose(prefix(ids.at[1, 5].set((ids[1, 5] + 1) % V)), base, atol=1e-6)
  plain = run(model, image, name='encode_queries')
  assert not np.allclose(plain, base, atol=1e-4)
  np.testing.assert_array_equal(plain, run(model, image, None, None, None, name='encode_queries'))


def test_instruct_qformer_is_called_like_hf():
  """``InstructQFormer(input_ids, attention_mask, query_embeds, encoder_hidden_states)``
  -> [B, Q + T, H]: the mask covers queries and text; either part may be left out."""
  cfg = tiny_cfg(instruction_aware=True, lm_head=False)
  model = model_util.random_module(lambda: qf.InstructQFormer(cfg, rngs=nnx.Rngs(0)))
  image, ids, mask = inputs()
  queries = jnp.broadcast_to(model.query_tokens[...][None], (B, Q, 16))
  full_mask = jnp.concatenate([jnp.ones((B, Q), mask.dtype), mask], 1)
  call = nnx.jit(lambda m, *a: m(*a))
  out = call(model, ids, full_mask, queries, image)
  assert out.shape == (B, Q + T, 16)
  np.testing.assert_allclose(out[:, :Q], run(model, image, None, ids, mask,
                                             name='encode_queries'), atol=1e-6)
  np.testing.assert_allclose(call(model, ids, mask), run(model, ids, mask, name='encode_text'),
                             atol=1e-6)
  np.testing.assert_allclose(call(model, None, None, queries, image),
                             run(model, image, name='encode_queries'), atol=1e-6)
  with pytest.raises(ValueError, match=r'attention_mask has shape \(2, 6\); expected \(2, 9\)'):
    jax.eval_shape(lambda: model(ids, mask, queries, image))


def _unscanned_params(scanned: dict, groups: int) -> dict:
  out = {k: v for k, v in scanned.items() if k != 'blocks'}  # 'tail' is never scanned
  out['blocks'] = {g: {'layers': jax.tree.map(lambda a: a[g], scanned['blocks']['layers'])}
                   for g in range(groups)}
  return out


@pytest.mark.parametrize('depth,freq', [(4, 1), (4, 2), (3, 2), (5, 2), (5, 3)])
def test_scan_equals_unrolled(depth, freq, model):
  cfg = dict(depth=depth, cross_attention_freq=freq)
  scanned = model if (depth, freq) == (4, 2) else make(tiny_cfg(**cfg))
  flat = make(tiny_cfg(scan_layers=False, **cfg), seed=7)
  state = nnx.state(flat, nnx.Param)
  nnx.replace_by_pure_dict(state, _unscanned_params(params_of(scanned), depth // freq))
  nnx.update(flat, state)
  image, ids, mask = inputs()
  # The ITG pass runs every layer path: cross-attention, both FFNs, the LM head.
  want = run(scanned, image, ids, mask, name='caption_logits')
  np.testing.assert_allclose(run(flat, image, ids, mask, name='caption_logits'), want,
                             atol=1e-5)
  if depth % freq:  # the tail runs: dropping its last layer changes the output
    cut = make(tiny_cfg(depth=depth - 1, cross_attention_freq=freq))
    kept = params_of(scanned)
    if depth % freq == 1:
      del kept['tail']
    else:
      del kept['tail']['layers'][depth % freq - 1]
    state = nnx.state(cut, nnx.Param)
    nnx.replace_by_pure_dict(state, kept)
    nnx.update(cut, state)
    assert not np.allclose(run(cut, image, ids, mask, name='caption_logits'), want, atol=1e-3)


def _layers_with_cross_attention(model, freq) -> list[int]:
  """Global indices of the layers that cross-attend (unscanned model: blocks + tail)."""
  groups = [*model.blocks] + ([model.tail] if model.tail is not None else [])
  size = len(groups[0].layers)
  return [g * size + i for g, block in enumerate(groups)
          for i, layer in enumerate(block.layers) if layer.cross_attention is not None]


@pytest.mark.parametrize('depth,freq,cross_layers', [
    (4, 1, [0, 1, 2, 3]), (4, 2, [0, 2]), (3, 2, [0, 2]), (5, 2, [0, 2, 4]), (5, 3, [0, 3]),
    (7, 3, [0, 3, 6]), (1, 2, [0]), (3, 5, [0])])
def test_cross_attention_where_hf_puts_it(depth, freq, cross_layers):
  """HF: layer i cross-attends iff i % cross_attention_frequency == 0, at any depth."""
  assert [i for i in range(depth) if i % freq == 0] == cross_layers
  model = make(tiny_cfg(depth=depth, cross_attention_freq=freq, scan_layers=False))
  assert _layers_with_cross_attention(model, freq) == cross_layers
  assert sum(len(b.layers) for b in model.blocks) + (
      len(model.tail.layers) if model.tail is not None else 0) == depth
  # The cross-attention keys/values read image tokens of encoder_width.
  assert model.blocks[0].layers[0].cross_attention.key.kernel.shape == (12, 16)
  # Scanned: whole groups stacked, the shorter rest unscanned.
  tree = params_of(make(tiny_cfg(depth=depth, cross_attention_freq=freq)))
  size = min(freq, depth)
  assert tree['blocks']['layers'][0]['attention']['query']['kernel'].shape[0] == depth // size
  assert ('tail' in tree) == bool(depth % size)
  if depth % size:
    assert sorted(tree['tail']['layers']) == list(range(depth % size))
    assert 'cross_attention' in tree['tail']['layers'][0]
    assert all('cross_attention' not in tree['tail']['layers'][i] for i in range(1, depth % size))


def test_layouts_of_multiple_depths_are_unchanged(model):
  """Depths that are a multiple of the frequency keep the layout converted towers and
  train checkpoints on disk were written with: no 'tail', [depth // freq] stacks."""
  tree = params_of(model)
  assert set(tree) == {'query_tokens', 'word_embed', 'pos_embed', 'embed_norm', 'blocks',
                       'lm_head'}
  assert set(tree['blocks']) == {'layers'} and set(tree['blocks']['layers']) == {0, 1}
  assert tree['blocks']['layers'][0]['cross_attention']['key']['kernel'].shape == (2, 12, 16)
  assert 'cross_attention' not in tree['blocks']['layers'][1]
  flat = make(tiny_cfg(scan_layers=False))
  assert set(params_of(flat)['blocks']) == {0, 1} and flat.tail is None


@pytest.mark.parametrize('depth', [4, 5])
def test_every_param_has_logical_axes(depth):
  model = make(tiny_cfg(depth=depth, type_vocab_size=2, pooler=True))
  known = {name for name, _ in sharding.DEFAULT_RULES}
  axes = sharding.logical_axes(nnx.state(model, nnx.Param))
  flat = jax.tree_util.tree_flatten_with_path(
      axes, is_leaf=lambda x: isinstance(x, tuple))[0]
  values = jax.tree_util.tree_flatten_with_path(params_of(model))[0]
  assert len(flat) == len(values) > 40
  shapes = {jax.tree_util.keystr(p): v.shape for p, v in values}
  for path, names in flat:
    key = jax.tree_util.keystr(path)
    assert names is not None and len(names) == len(shapes[key]), key
    assert set(names) - {None} <= known, (key, names)
    if key.startswith("['blocks']"):
      assert names[0] == 'layers', key
    if key.startswith("['tail']"):  # unscanned: no stacked axis
      assert 'layers' not in names, key
  assert any(jax.tree_util.keystr(p).startswith("['tail']") for p, _ in flat) == (depth == 5)
  assert sharding.logical_axes(nnx.state(model, nnx.Param))['query_tokens'] == ('queries', 'embed')


def test_bf16_compute_dtype():
  model = make(tiny_cfg(dtype='bfloat16'))
  image, ids, mask = inputs()
  out = jax.eval_shape(lambda: (model.caption_logits(image, ids, mask), model.match(image, ids, mask)))
  assert [o.dtype for o in out] == [jnp.bfloat16] * 2
  assert model.query_tokens[...].dtype == jnp.float32  # f32 master weights


@pytest.mark.parametrize('depth', [4, 3])
def test_grads_flow_through_remat_scan_to_queries_and_cross_attention(depth):
  model = make(tiny_cfg(remat='dots', depth=depth))
  image, ids, mask = inputs()
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    m = nnx.merge(graphdef, p)
    logits = m.caption_logits(image, ids, mask)
    # The last layer's cross-attention reaches only the query outputs, which the ITG
    # logits never read: add a query-side term (the LLM prefix's path).
    return -jax.nn.log_softmax(logits)[..., 0].mean() + jnp.square(m.encode_queries(image)).mean()

  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads['query_tokens']).max()) > 0
  cross = grads['blocks']['layers'][0]['cross_attention']['key']['kernel']
  assert cross.shape == (depth // 2, 12, 16) and float(jnp.abs(cross).max()) > 0
  if depth == 3:  # the tail's layer (index 2) cross-attends, under remat too
    tail = grads['tail']['layers'][0]['cross_attention']['key']['kernel']
    assert tail.shape == (12, 16) and float(jnp.abs(tail).max()) > 0


def test_errors_name_the_problem():
  no_queries = make(tiny_cfg(num_queries=0))
  image, ids, mask = inputs()
  with pytest.raises(ValueError, match='num_queries=0'):
    no_queries.encode_queries(image)
  no_text = make(tiny_cfg(vocab_size=0))
  with pytest.raises(ValueError, match='vocab_size=0'):
    no_text.encode_text(ids, mask)
  with pytest.raises(ValueError, match='max_position=16'):
    jax.eval_shape(lambda: no_queries.encode_text(jnp.ones((1, 17), jnp.int32)))
  with pytest.raises(ValueError, match='image tokens'):
    jax.eval_shape(lambda: no_queries(jnp.ones((1, 2, 16)), None))
  with pytest.raises(ValueError, match='unknown keys'):
    qf.default_config(hiden=3)
  with pytest.raises(ValueError, match='num_queries=3 needs cross_attention_freq'):
    make(tiny_cfg(cross_attention_freq=0))
  with pytest.raises(ValueError, match='instruction_aware needs a text side'):
    make(tiny_cfg(vocab_size=0, instruction_aware=True))
  with pytest.raises(ValueError, match='not instruction-aware'):
    jax.eval_shape(lambda: make(tiny_cfg()).encode_queries(image, None, ids, mask))
