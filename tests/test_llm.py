"""Decoder LLM: KV-cache decoding == full forward, greedy generate == repeated argmax,
scan == unscanned, padding invariance, tied embeddings, bf16, remat gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unifer_jax import sharding
from unifer_jax.models import llm

VOCAB = 97


def make(scan=True, kv_heads=2, seed=0, **kw):
  """A tiny LLM with random weights drawn in numpy: built abstractly (no init compiles),
  weights larger than the default init so logits spread and argmax ties cannot happen."""
  cfg = llm.default_config(vocab_size=VOCAB, hidden=32, depth=2, heads=4, kv_heads=kv_heads,
                           mlp_dim=64, scan_layers=scan, **kw)
  model = nnx.eval_shape(lambda: llm.LLM(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  def draw(path, p):
    is_norm = 'scale' in str(path)  # RMSNorm scales around 1, everything else around 0
    return jnp.asarray(0.15 * rng.standard_normal(p.shape) + is_norm, p.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(draw, state))
  return model


def tokens(b, t, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, (b, t)), jnp.int32)


def left_padded(ids, pads):
  """Shifts row i right by pads[i] (pad id 0) and returns (ids, mask)."""
  b, t = ids.shape
  mask = np.ones((b, t), bool)
  out = np.zeros((b, t), np.int32)
  for i, p in enumerate(pads):
    out[i, p:] = np.asarray(ids[i, :t - p])
    mask[i, :p] = False
  return jnp.asarray(out), jnp.asarray(mask)


def jitted(model, fn):
  """``fn(model, *args)`` compiled once over the model's state."""
  graphdef, state = nnx.split(model)
  compiled = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
  return lambda *args: jax.tree.map(np.asarray, compiled(state, *args))


def forward(model):
  return jitted(model, lambda m, ids, mask: m(ids, attention_mask=mask))


def unstack_layers(params, depth):
  """Pure dict of a scanned model -> the same params for the unscanned model."""
  layer = params['layers']
  return {**params, 'layers': {i: jax.tree.map(lambda a: a[i], layer) for i in range(depth)}}


@pytest.mark.parametrize('scan,kv_heads', [(True, 2), (False, 2), (True, 1), (False, 1)])
def test_kv_cache_matches_full_forward_with_left_padding(scan, kv_heads):
  model = make(scan, kv_heads)
  ids, mask = left_padded(tokens(3, 9), pads=[0, 2, 5])
  full = forward(model)(ids, mask)
  valid = np.asarray(mask)

  cache = model.init_cache(3, 12)
  logits, cache = jax.jit(lambda c, i, a: model.prefill(c, i, attention_mask=a))(
      cache, ids[:, :6], mask[:, :6])
  np.testing.assert_array_less(np.abs(np.asarray(logits) - full[:, :6])[valid[:, :6]], 1e-5)
  step = jax.jit(model.decode_step)
  for t in range(6, 9):
    logits, cache = step(cache, ids[:, t])
    np.testing.assert_array_less(np.abs(np.asarray(logits) - full[:, t]), 1e-5)
  assert int(cache['index']) == 9
  np.testing.assert_array_equal(np.asarray(cache['pos']), [9, 7, 4])
  assert cache['k'].shape == (2, 3, 12, kv_heads, 8)


def test_left_padding_does_not_change_logits():
  model = make()
  ids = tokens(1, 7)
  padded, mask = left_padded(jnp.concatenate([ids, ids]), pads=[0, 3])
  out = forward(model)(padded, mask)
  ref = forward(model)(ids[:, :4], jnp.ones((1, 4), bool))
  np.testing.assert_allclose(out[1, 3:], ref[0], atol=1e-5)
  # And the unpadded row is unaffected by the other row's padding.
  np.testing.assert_allclose(out[0], forward(model)(ids, jnp.ones((1, 7), bool))[0], atol=1e-5)


def greedy_reference(model, ids, mask, n):
  """Greedy tokens by repeated full forwards over a fixed-size buffer (one compile):
  causal attention makes the not-yet-generated (masked) tail irrelevant."""
  fwd = forward(model)
  b, t = ids.shape
  buf = np.concatenate([np.asarray(ids), np.zeros((b, n), np.int32)], 1)
  valid = np.concatenate([np.asarray(mask), np.zeros((b, n), bool)], 1)
  for i in range(n):
    buf[:, t + i] = fwd(buf, valid)[:, t + i - 1].argmax(-1)
    valid[:, t + i] = True
  return buf[:, t:]


def generator(model, **static):
  return jitted(model, lambda m, ids, mask: llm.generate(m, ids, attention_mask=mask, **static))


@pytest.mark.parametrize('scan', [True, False])
def test_greedy_generate_matches_repeated_full_forward(scan):
  model = make(scan, kv_heads=1)
  ids, mask = left_padded(tokens(3, 6, seed=3), pads=[0, 1, 4])
  ref = greedy_reference(model, ids, mask, 6)
  np.testing.assert_array_equal(generator(model, max_new_tokens=6)(ids, mask), ref)

  # eos: the eos itself is emitted, everything after it is pad_id; other rows go on.
  eos = int(ref[0, 1])
  expected = ref.copy()
  for row in expected:
    hits = np.flatnonzero(row == eos)
    if hits.size:
      row[hits[0] + 1:] = -1
  out = generator(model, max_new_tokens=6, eos_id=eos, pad_id=-1)(ids, mask)
  np.testing.assert_array_equal(out, expected)
  assert out[0, 1] == eos and np.all(out[0, 2:] == -1)


def test_generate_right_padding_from_embeddings_equals_left_padding():
  model = make()
  ids = tokens(2, 5, seed=4)
  right_mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  left_ids, left_mask = left_padded(ids, pads=[0, 2])
  ref = greedy_reference(model, left_ids, left_mask, 4)
  # The multimodal model feeds embeddings (image prefix + text) instead of ids.
  out = jitted(model, lambda m, ids, mask: llm.generate(
      m, inputs_embeds=m.embed(ids), attention_mask=mask, max_new_tokens=4))(ids, right_mask)
  np.testing.assert_array_equal(out, ref)


def test_sampling_respects_top_k_and_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 256))
  rng = jax.random.key(0)
  top2 = np.asarray(llm.sample_logits(logits, rng, temperature=1.0, top_k=2))
  assert set(top2) == {0, 1}
  nucleus = np.asarray(llm.sample_logits(logits, rng, temperature=1.0, top_p=0.7))
  assert set(nucleus) == {0, 1}  # 0.5 < 0.7 <= 0.8: the first two tokens
  free = np.asarray(llm.sample_logits(logits, rng, temperature=1.0))
  assert set(free) == {0, 1, 2, 3}
  assert 0.4 < np.mean(free == 0) < 0.6
  cold = np.asarray(llm.sample_logits(logits, rng, temperature=1e-4))
  assert np.all(cold == 0)
  with pytest.raises(ValueError, match='rng'):
    llm.generate(make(), tokens(1, 2), max_new_tokens=1, temperature=1.0)


def test_scan_and_unscanned_agree_on_identical_params():
  scanned, unscanned = make(True), make(False)
  params = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  nnx.replace_by_pure_dict(state := nnx.state(unscanned, nnx.Param), unstack_layers(params, 2))
  nnx.update(unscanned, state)
  ids, mask = left_padded(tokens(2, 7), pads=[0, 2])
  np.testing.assert_allclose(forward(unscanned)(ids, mask), forward(scanned)(ids, mask),
                             atol=1e-6)


def test_tied_embeddings_use_the_embedding_matrix():
  model = make(tie_embeddings=True)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert 'lm_head' not in params
  ids = tokens(2, 5)
  logits, h = jitted(model, lambda m, ids: (m(ids), m.hidden_states(ids)))(ids)
  np.testing.assert_allclose(logits, h @ params['token_embed']['embedding'].T, atol=1e-5)


def test_bf16_compute_stays_close_to_f32():
  f32 = make()
  bf16 = make(dtype='bfloat16')
  ids, mask = left_padded(tokens(2, 8), pads=[0, 3])
  ref = forward(f32)(ids, mask)
  out, h = jitted(bf16, lambda m, ids, mask: (m(ids, attention_mask=mask),
                                              m.hidden_states(ids, attention_mask=mask)))(ids, mask)
  assert out.dtype == np.float32 and h.dtype == jnp.bfloat16  # logits always f32
  err = np.abs(out - ref)[np.asarray(mask)].max() / np.abs(ref).max()
  assert err < 0.03, err
  # Cached decoding in bf16 (bf16 cache) picks the same tokens as the bf16 forward.
  np.testing.assert_array_equal(generator(bf16, max_new_tokens=3)(ids, mask),
                                greedy_reference(bf16, ids, mask, 3))


@pytest.mark.parametrize('scan', [True, False])
def test_remat_gives_the_same_gradients(scan):
  ids = tokens(2, 6)

  def grads(remat):
    model = make(scan, remat=remat)
    graphdef, state = nnx.split(model)

    def loss(state):
      logits = nnx.merge(graphdef, state)(ids[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    return jax.jit(jax.grad(loss))(state)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               grads('none'), grads('full'))


def flatten(tree, prefix=''):
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  return {k: v for key, sub in tree.items() for k, v in flatten(sub, f'{prefix}{key}/').items()}


def test_every_param_has_logical_axes():
  for scan, tie, bias in [(True, False, True), (False, True, False)]:
    model = make(scan, tie_embeddings=tie, qkv_bias=bias)
    axes = nnx.to_pure_dict(sharding.logical_axes(nnx.state(model, nnx.Param)))
    flat = flatten(axes)
    lead = ('layers',) if scan else ()
    pre = 'layers' if scan else 'layers/0'
    assert flat['token_embed/embedding'] == ('vocab', 'embed')
    assert flat[f'{pre}/attn/q/kernel'] == lead + ('embed', 'heads')
    assert flat[f'{pre}/attn/k/kernel'] == lead + ('embed', 'kv_heads')
    assert flat[f'{pre}/attn/o/kernel'] == lead + ('heads', 'embed')
    assert flat[f'{pre}/mlp/down/kernel'] == lead + ('mlp', 'embed')
    assert flat[f'{pre}/attn_norm/scale'] == lead + ('norm',)
    assert flat['final_norm/scale'] == ('norm',)
    assert ('lm_head/kernel' in flat) == (not tie)
    assert (f'{pre}/attn/v/bias' in flat) == bias
    assert all(v is not None and set(v) <= {n for n, _ in sharding.DEFAULT_RULES}
               for v in flat.values())
