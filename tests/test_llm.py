"""Decoder LLM: KV-cache decoding == full forward, greedy generate == repeated argmax,
scan == unscanned == unrolled, grouped attention == jax.nn's, padding invariance, tied
embeddings, bf16, remat gradients; the same for the OPT switches (LayerNorm, learned
positions, ReLU MLP, biases), and their matmul FLOPs as step_cost counts them. (Parity
with HF's models: test_convert_llm.py.)

Compiles dominate the run time, so every test uses a few shapes (3 rows, a 6-token
prompt, 5 new tokens) and module-level functions jitted with the graphdef static:
models with equal configs share one compile.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unifer_jax import sharding
from unifer_jax.models import llm

VOCAB = 97
PROMPT, NEW = 6, 5
PADS = (0, 2, 4)  # left padding per row
# OPT's switches (kv_heads must equal heads = 4).
OPT = dict(norm='layer', position_embedding='learned', mlp='relu', qkv_bias=True, o_bias=True,
           mlp_bias=True, tie_embeddings=True, max_seq_len=24)


def make(scan=True, kv_heads=2, seed=0, **kw):
  """A tiny LLM with random weights drawn in numpy: built abstractly (no init compiles),
  weights larger than the default init so logits spread and argmax ties cannot happen."""
  cfg = llm.default_config(vocab_size=VOCAB, hidden=32, depth=2, heads=4, kv_heads=kv_heads,
                           mlp_dim=64, scan_layers=scan, **kw)
  model = nnx.eval_shape(lambda: llm.LLM(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)

  def draw(path, p):
    is_norm = 'scale' in str(path)  # RMSNorm scales around 1, everything else around 0
    return jnp.asarray(0.15 * rng.standard_normal(p.shape) + is_norm, p.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(draw, nnx.state(model, nnx.Param)))
  return model


def tokens(b, t, seed=0):
  return np.random.default_rng(seed).integers(1, VOCAB, (b, t)).astype(np.int32)


def left_padded(ids, pads=PADS):
  """Shifts row i right by pads[i] (pad id 0); returns (ids, mask)."""
  b, t = ids.shape
  out, mask = np.zeros((b, t), np.int32), np.ones((b, t), bool)
  for i, p in enumerate(pads):
    out[i, p:] = ids[i, :t - p]
    mask[i, :p] = False
  return out, mask


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(graphdef, fn, state, *args):
  return fn(nnx.merge(graphdef, state), *args)


def call(fn, model, *args):
  """``fn(model, *args)`` jitted; ``fn`` must be a module-level function (the cache key)."""
  graphdef, state = nnx.split(model)
  return jax.tree.map(np.asarray, _run(graphdef, fn, state, *args))


def _logits(m, ids, mask):
  return m(ids, attention_mask=mask)


def _prefill(m, cache, ids, mask):
  return m.prefill(cache, ids, attention_mask=mask)


def _decode(m, cache, token):
  return m.decode_step(cache, token)


def _generate(m, ids, mask, eos_id, pad_id):
  return llm.generate(m, ids, attention_mask=mask, max_new_tokens=NEW, eos_id=eos_id,
                      pad_id=pad_id)


def _generate_from_embeds(m, ids, mask):
  # The multimodal model feeds embeddings (image prefix + text) instead of ids.
  return llm.generate(m, inputs_embeds=m.embed(ids), attention_mask=mask, max_new_tokens=NEW)


def greedy_reference(model, ids, mask):
  """Greedy tokens by repeated full forwards over a fixed [B, PROMPT + NEW] buffer (one
  compile): causal attention makes the not-yet-generated (masked) tail irrelevant."""
  b, t = ids.shape
  buf = np.concatenate([ids, np.zeros((b, NEW), np.int32)], 1)
  valid = np.concatenate([mask, np.zeros((b, NEW), bool)], 1)
  for i in range(NEW):
    buf[:, t + i] = call(_logits, model, buf, valid)[:, t + i - 1].argmax(-1)
    valid[:, t + i] = True
  return buf[:, t:]


@pytest.mark.parametrize('scan,kv_heads,kw', [(True, 2, {}), (False, 2, {}), (True, 1, {}),
                                               (False, 1, {}), (True, 4, OPT), (False, 4, OPT)])
def test_kv_cache_matches_full_forward_with_left_padding(scan, kv_heads, kw):
  model = make(scan, kv_heads, **kw)
  ids, mask = left_padded(tokens(3, PROMPT + NEW))
  full = call(_logits, model, ids, mask)

  cache = model.init_cache(3, PROMPT + NEW + 2)
  logits, cache = call(_prefill, model, cache, ids[:, :PROMPT], mask[:, :PROMPT])
  assert np.abs(logits - full[:, :PROMPT])[mask[:, :PROMPT]].max() <= 1e-5
  for t in range(PROMPT, PROMPT + NEW):
    logits, cache = call(_decode, model, cache, ids[:, t])
    assert np.abs(logits - full[:, t]).max() <= 1e-5
  assert cache['index'] == PROMPT + NEW
  np.testing.assert_array_equal(cache['pos'], PROMPT + NEW - np.asarray(PADS))
  np.testing.assert_array_equal(cache['valid'][:, :PROMPT + NEW], mask)
  assert cache['k'].shape == (2, 3, PROMPT + NEW + 2, kv_heads, 8)


@pytest.mark.parametrize('kw', [{}, dict(OPT, kv_heads=4)], ids=['llama', 'opt'])
def test_left_padding_does_not_change_logits(kw):
  ids = tokens(3, PROMPT + NEW)
  ids[1] = ids[0]
  padded, mask = left_padded(ids)
  out = call(_logits, make(**kw), padded, mask)
  # Row 1 is row 0 shifted right by 2 pads: same tokens, same positions, same logits.
  np.testing.assert_allclose(out[1, 2:], out[0, :-2], atol=1e-5)


def test_opt_generate_matches_repeated_full_forward_and_refuses_past_its_table():
  model = make(kv_heads=4, **OPT)
  ids, mask = left_padded(tokens(3, PROMPT, seed=5))
  np.testing.assert_array_equal(call(_generate, model, ids, mask, -1, 0),
                                greedy_reference(model, ids, mask))
  # 25 slots > max_seq_len=24 rows of learned positions (HF OPT would index past its
  # table): refused by name, not NaN.
  with pytest.raises(ValueError, match='llm.max_seq_len=24'):
    jax.eval_shape(lambda: model(tokens(1, 25)))
  with pytest.raises(ValueError, match='learned position table'):
    jax.eval_shape(lambda: llm.generate(model, tokens(1, 10), max_new_tokens=15))


def test_greedy_generate_matches_repeated_full_forward():
  model = make(True, kv_heads=1)
  ids, mask = left_padded(tokens(3, PROMPT, seed=3))
  ref = greedy_reference(model, ids, mask)
  np.testing.assert_array_equal(call(_generate, model, ids, mask, -1, 0), ref)

  # eos (same compile, eos_id traced): the eos itself is emitted, everything after it is
  # pad_id; other rows go on.
  eos = int(ref[0, 1])
  expected = ref.copy()
  for row in expected:
    hits = np.flatnonzero(row == eos)
    if hits.size:
      row[hits[0] + 1:] = -1
  out = call(_generate, model, ids, mask, eos, -1)
  np.testing.assert_array_equal(out, expected)
  assert out[0, 1] == eos and np.all(out[0, 2:] == -1)


def test_generate_right_padding_from_embeddings_equals_left_padding():
  model = make()
  ids = tokens(3, PROMPT, seed=4)
  right_mask = np.arange(PROMPT)[None] < (PROMPT - np.asarray(PADS))[:, None]
  left_ids, left_mask = left_padded(ids)  # the same valid tokens, padded on the left
  ref = greedy_reference(model, left_ids, left_mask)
  np.testing.assert_array_equal(call(_generate_from_embeds, model, ids, right_mask), ref)


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


def unstack_layers(params, depth):
  """Pure dict of a scanned model -> the same params for the unscanned model."""
  layer = params['layers']
  return {**params, 'layers': {i: jax.tree.map(lambda a: a[i], layer) for i in range(depth)}}


def test_scan_and_unscanned_agree_on_identical_params():
  scanned, unscanned = make(True), make(False)
  params = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  state = nnx.state(unscanned, nnx.Param)
  nnx.replace_by_pure_dict(state, unstack_layers(params, 2))
  nnx.update(unscanned, state)
  ids, mask = left_padded(tokens(3, PROMPT + NEW))
  np.testing.assert_allclose(call(_logits, unscanned, ids, mask),
                             call(_logits, scanned, ids, mask), atol=1e-6)


def test_unrolled_stack_equals_the_scan_on_the_same_stacked_params():
  """unroll_layers keeps the stacked parameter tree and runs it as straight-line code:
  same logits, same gradients, same cached decoding."""
  scanned, unrolled = make(True), make(True, unroll_layers=True)
  assert jax.tree.map(np.shape, nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))) == \
      jax.tree.map(np.shape, nnx.to_pure_dict(nnx.state(scanned, nnx.Param)))
  ids, mask = left_padded(tokens(3, PROMPT + NEW))
  np.testing.assert_allclose(call(_logits, unrolled, ids, mask),
                             call(_logits, scanned, ids, mask), atol=1e-6)
  prompt, prompt_mask = ids[:, :PROMPT], mask[:, :PROMPT]
  np.testing.assert_array_equal(call(_generate, unrolled, prompt, prompt_mask, -1, 0),
                                call(_generate, scanned, prompt, prompt_mask, -1, 0))

  def grads(model):
    graphdef, state = nnx.split(model)
    loss = lambda st: jnp.sum(nnx.merge(graphdef, st)(ids, attention_mask=mask) ** 2)
    return jax.jit(jax.grad(loss))(state)

  # Gradients of a sum of squared logits reach ~100; the two programs sum in different
  # orders (one element in 3104 differed by 3.4e-5 relative at the tests' XLA -O0).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads(unrolled), grads(scanned))


@pytest.mark.parametrize('heads,kv_heads', [(4, 2), (4, 4), (6, 1)])
def test_grouped_attention_equals_jax_dot_product_attention(heads, kv_heads):
  """The CPU/TPU attention (layers.grouped_attention) against jax.nn's XLA path, with
  and without padding/causal/per-head/all-masked masks, forward and gradients."""
  from unifer_jax.models import layers
  r = np.random.default_rng(heads + kv_heads)
  b, t, s, h = 2, 5, 7, 8
  q = jnp.asarray(r.standard_normal((b, t, heads, h)), jnp.float32)
  k, v = (jnp.asarray(r.standard_normal((b, s, kv_heads, h)), jnp.float32) for _ in range(2))
  valid = jnp.asarray(r.random((b, s)) > 0.3).at[:, 0].set(True)
  masks = [None, layers.padding_mask(valid), layers.causal_mask(t, s) & layers.padding_mask(valid),
           jnp.asarray(r.random((b, heads, t, s)) > 0.5), jnp.zeros((b, 1, t, s), bool)]
  for mask in masks:
    ref = lambda q, k, v, m=mask: jax.nn.dot_product_attention(q, k, v, mask=m)
    got = lambda q, k, v, m=mask: layers.grouped_attention(q, k, v, m)
    np.testing.assert_allclose(got(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
    square = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) ** 2), (0, 1, 2))(q, k, v)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5),
                 square(got), square(ref))


def _logits_and_hidden(m, ids):
  return m(ids), m.hidden_states(ids)


def test_tied_embeddings_use_the_embedding_matrix():
  model = make(tie_embeddings=True)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert 'lm_head' not in params
  logits, h = call(_logits_and_hidden, model, tokens(3, PROMPT))
  np.testing.assert_allclose(logits, h @ params['token_embed']['embedding'].T, atol=1e-5)


def test_bf16_compute_stays_close_to_f32():
  f32, bf16 = make(), make(dtype='bfloat16')
  ids, mask = left_padded(tokens(3, PROMPT + NEW))
  ref = call(_logits, f32, ids, mask)
  out = call(_logits, bf16, ids, mask)
  assert out.dtype == np.float32  # logits always f32
  assert jax.eval_shape(lambda: bf16.hidden_states(ids)).dtype == jnp.bfloat16
  err = np.abs(out - ref)[mask].max() / np.abs(ref).max()
  assert err < 0.03, err
  # Cached decoding in bf16 (bf16 cache) picks the same tokens as the bf16 forward.
  prompt, prompt_mask = ids[:, :PROMPT], mask[:, :PROMPT]
  np.testing.assert_array_equal(call(_generate, bf16, prompt, prompt_mask, -1, 0),
                                greedy_reference(bf16, prompt, prompt_mask))


def test_remat_gives_the_same_gradients():
  ids = tokens(2, 6)

  def grads(remat):
    graphdef, state = nnx.split(make(remat=remat))

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
    flat = flatten(nnx.to_pure_dict(sharding.logical_axes(nnx.state(model, nnx.Param))))
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


def test_opt_params_have_logical_axes():
  for scan in (True, False):
    model = make(scan, kv_heads=4, **OPT)
    flat = flatten(nnx.to_pure_dict(sharding.logical_axes(nnx.state(model, nnx.Param))))
    lead = ('layers',) if scan else ()
    pre = 'layers' if scan else 'layers/0'
    # Position rows are not sharded (as the ViT's and Q-Former's tables).
    assert flat['pos_embed/embedding'] == (None, 'embed')
    assert flat[f'{pre}/attn_norm/bias'] == lead + ('norm',)
    assert flat['final_norm/bias'] == ('norm',)
    assert flat[f'{pre}/attn/o/bias'] == lead + ('embed',)
    assert flat[f'{pre}/mlp/up/bias'] == lead + ('mlp',)
    assert flat[f'{pre}/mlp/down/bias'] == lead + ('embed',)
    assert not any('/gate/' in k for k in flat) and 'lm_head/kernel' not in flat
    names = {n for n, _ in sharding.DEFAULT_RULES} | {None}
    assert all(v is not None and set(v) <= names for v in flat.values())


def test_step_cost_counts_opt_matmuls():
  """step_cost.matmul_cost (the MFU counter) of an OPT forward: the projections, the two
  MLP matmuls, attention and the tied head -- no FLOPs for the position lookup -- and a
  gradient costs three forwards."""
  from unifer_jax.train import step_cost
  b, t, d, f, depth = 3, PROMPT, 32, 64, 2
  graphdef, state = nnx.split(make(kv_heads=4, **OPT))
  ids = tokens(b, t)
  forward = lambda s: jnp.sum(nnx.merge(graphdef, s)(ids))
  per_token = depth * (4 * d * d + 2 * d * f) + d * VOCAB
  attention = depth * 2 * (2 * b * t * t * d)  # q.k and p.v over every head
  expected = 2 * b * t * per_token + attention
  assert step_cost.matmul_cost(jax.make_jaxpr(forward)(state))[0] == expected
  assert step_cost.matmul_cost(jax.make_jaxpr(jax.grad(forward))(state))[0] == 3 * expected
