"""ViT encoder (vit / clip / siglip / blip2 layouts) and the FER student."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unifer_jax import sharding
from unifer_jax.models import student as student_lib
from unifer_jax.models import vit

import model_util

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64)
IMAGES = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)


def tiny(**kw):
  return vit.default_config(**{**TINY, **kw})


def pure(module):
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def with_params(cfg, params, cls=vit.ViT):
  """A module for ``cfg`` holding ``params`` (built abstractly: no init compiles)."""
  module = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(module, state)
  return module


@functools.cache
def _forward(graphdef):
  @jax.jit
  def forward(state, images):
    m = nnx.merge(graphdef, state)
    hidden = m(images)
    return hidden, (None if m.cfg.pool == 'none' else m.pool(hidden))
  return forward


def run(model, images=IMAGES):
  """(last hidden state, pooled or None), jitted and cached per model structure: one
  compile per architecture, far cheaper on these CPUs than op-by-op eager dispatch."""
  graphdef, state = nnx.split(model)
  return jax.tree.map(np.asarray, _forward(graphdef)(state, images))


@pytest.mark.parametrize('variant,pool,pooler,tokens', [
    ('vit', 'cls', True, 17), ('vit', 'map', False, 17), ('clip', 'gap', False, 17),
    ('siglip', 'gap', False, 16), ('blip2', 'cls', False, 17)])
def test_shapes_per_variant_and_pool(variant, pool, pooler, tokens):
  model = vit.ViT(tiny(variant=variant, pool=pool, pooler=pooler), rngs=nnx.Rngs(0))
  hidden, pooled = run(model)
  assert hidden.shape == (2, tokens, 32)
  assert pooled.shape == (2, 32)
  assert np.isfinite(pooled).all()
  if pool == 'gap':  # mean of the patch tokens, the cls token left out
    np.testing.assert_allclose(pooled, hidden[:, tokens - 16:].mean(1), atol=1e-6)
  if pooler:  # HF ViTModel's pooler: tanh(dense(cls)), after the final layernorm
    dense = model.pooler
    want = np.tanh(hidden[:, 0] @ np.asarray(dense.kernel[...]) + np.asarray(dense.bias[...]))
    np.testing.assert_allclose(pooled, want, atol=1e-5)


def test_pool_none_has_no_pooled_output_and_bad_configs_are_named():
  model = vit.ViT(tiny(pool='none'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pool='none'"):
    model.pool(np.zeros((2, 17, 32), np.float32))
  with pytest.raises(ValueError, match='class token'):
    vit.ViT(tiny(variant='siglip', pool='cls'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='vit.variant'):
    vit.ViT(tiny(variant='deit'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'\[B, 32, 32, 3\].*\(2, 64, 64, 3\)'):
    model(np.zeros((2, 64, 64, 3), np.float32))


def test_every_param_has_known_logical_axes():
  known = {name for name, _ in sharding.DEFAULT_RULES}
  for variant, scan in (('siglip', True), ('siglip', False), ('blip2', True)):
    pool = 'map' if variant == 'siglip' else 'cls'
    model = nnx.eval_shape(lambda: vit.ViT(tiny(variant=variant, pool=pool, scan_layers=scan),
                                           rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    axes = nnx.to_flat_state(sharding.logical_axes(state))
    shapes = nnx.to_flat_state(state)
    assert len(axes) == len(shapes) > 20
    for (path, names), (_, var) in zip(axes, shapes):
      names = names.get_value() if isinstance(names, nnx.Variable) else names
      assert names is not None and len(names) == len(var.get_value().shape), (path, names)
      assert set(names) - {None} <= known, (path, names)
      if scan and path[0] == 'blocks':
        assert names[0] == 'layers', path
  unrolled = nnx.eval_shape(lambda: vit.ViT(tiny(scan_layers=False), rngs=nnx.Rngs(0)))
  kernel_axes = sharding.logical_axes(nnx.state(unrolled))
  assert tuple(kernel_axes['patch_embed']['kernel']) == ('patch', 'embed')
  assert tuple(kernel_axes['blocks'][0]['attn']['query']['kernel']) == ('embed', 'heads')
  assert tuple(kernel_axes['blocks'][0]['attn']['out']['kernel']) == ('heads', 'embed')
  assert tuple(kernel_axes['blocks'][1]['mlp']['fc2']['kernel']) == ('mlp', 'embed')


@pytest.mark.parametrize('variant', ['clip', 'siglip', 'blip2'])
def test_scanned_and_unrolled_stacks_compute_the_same(variant):
  pool = 'map' if variant == 'siglip' else 'cls'
  scanned = vit.ViT(tiny(variant=variant, pool=pool), rngs=nnx.Rngs(1))
  params = pure(scanned)
  # Unstack the [layers, ...] leaves into per-layer dicts for the nnx.List layout.
  unrolled_params = dict(params, blocks={
      i: jax.tree.map(lambda a: a[i], params['blocks']) for i in range(TINY['depth'])})
  unrolled = with_params(tiny(variant=variant, pool=pool, scan_layers=False), unrolled_params)
  remat = with_params(tiny(variant=variant, pool=pool, remat='full'), params)
  want_hidden, want_pooled = run(scanned)
  for got_hidden, got_pooled in (run(unrolled), run(remat)):
    np.testing.assert_allclose(got_hidden, want_hidden, atol=1e-5)
    np.testing.assert_allclose(got_pooled, want_pooled, atol=1e-5)
  # Other weights give other outputs, so the equalities above are not vacuous.
  other = jax.tree.map(lambda a: a * 1.5, params)
  assert np.abs(run(with_params(tiny(variant=variant, pool=pool), other))[0]
                - want_hidden).max() > 1e-2


def test_clip_post_layernorm_touches_only_the_pooled_token():
  model = vit.ViT(tiny(variant='clip', pool='cls'), rngs=nnx.Rngs(0))
  hidden, pooled = run(model)
  model.pool_norm.scale[...] = 2.0 * model.pool_norm.scale[...]
  hidden2, pooled2 = run(model)
  np.testing.assert_array_equal(hidden2, hidden)
  np.testing.assert_allclose(pooled2, 2.0 * pooled, atol=1e-5)


def test_blip2_final_norm_is_on_every_token_and_the_cls_pool_norms_again():
  """BLIP-2: ``final_norm`` (HF post_layernorm, LAVIS ln_vision) ends the last hidden
  state; HF's pooler_output is that norm applied once more to the cls token."""
  # eps ~0 so the normalised statistics are exact (the init's cls token is near constant).
  model = vit.ViT(tiny(variant='blip2', pool='cls', layer_norm_eps=1e-12), rngs=nnx.Rngs(0))
  assert model.pre_norm is None and model.pool_norm is None and model.pooler is None
  assert model.patch_embed.bias is not None and model.cls_token is not None
  rng = np.random.default_rng(0)
  scale, bias = 1.0 + 0.5 * rng.random(32, np.float32), rng.standard_normal(32, np.float32)
  model.final_norm.scale[...], model.final_norm.bias[...] = scale, bias
  hidden, pooled = run(model)
  unit = (hidden - bias) / scale  # every token left a LayerNorm: mean 0, variance 1
  np.testing.assert_allclose(unit.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(unit.var(-1), 1.0, atol=1e-4)
  cls = hidden[:, 0]
  again = (cls - cls.mean(-1, keepdims=True)) / np.sqrt(cls.var(-1, keepdims=True))
  np.testing.assert_allclose(pooled, again * scale + bias, atol=1e-4)
  assert np.abs(pooled - cls).max() > 0.1  # the second norm is not the identity here


def test_bf16_compute_is_close_to_f32():
  cfg = tiny(variant='siglip', pool='map')
  f32 = vit.ViT(cfg, rngs=nnx.Rngs(0))
  bf16 = with_params(tiny(variant='siglip', pool='map', dtype='bfloat16'), pure(f32))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(pure(bf16)))  # f32 master params
  (want, want_pool), (got, got_pool) = run(f32), run(bf16)
  assert got.dtype == jnp.bfloat16
  rel = np.abs(got.astype(np.float32) - want).max() / np.abs(want).max()
  rel_pool = np.abs(got_pool.astype(np.float32) - want_pool).max() / np.abs(want_pool).max()
  assert rel < 3e-2 and rel_pool < 3e-2, (rel, rel_pool)
  assert rel > 0  # really computed in bf16


# -- student ---------------------------------------------------------------------------

def small_student(**encoder):
  return student_lib.default_config(encoder=dict(image_size=32, patch_size=8, width=32, depth=2,
                                                 heads=2, mlp_dim=64, **encoder))


def test_student_jitted_forward_shapes_ranges_heads_and_export():
  model = student_lib.Student(small_student(), rngs=nnx.Rngs(0))
  # Huge head weights drive sigmoid/tanh into saturation: the ranges must still hold.
  model.intensity_head.kernel[...] = 1e3 * model.intensity_head.kernel[...]
  model.va_head.kernel[...] = 1e3 * model.va_head.kernel[...]
  graphdef, state = nnx.split(model)

  def forward(state, images):
    return nnx.merge(graphdef, state)(images)

  out = jax.tree.map(np.asarray, jax.jit(forward)(state, IMAGES))
  assert out['basic'].shape == (2, 8) == (2, len(student_lib.BASIC_EXPRESSIONS))
  assert out['compound'].shape == (2, 11) == (2, len(student_lib.COMPOUND_EXPRESSIONS))
  assert out['intensity'].shape == (2,) and out['va'].shape == (2, 2)
  assert out['embedding'].shape == (2, 32)
  assert ((out['intensity'] >= 0) & (out['intensity'] <= 1)).all()
  assert ((out['va'] >= -1) & (out['va'] <= 1)).all()
  assert np.abs(out['va']).max() > 0.99  # saturated, as intended above
  for name in ('basic', 'compound', 'intensity', 'va'):
    assert out[name].dtype == np.float32 and np.isfinite(out[name]).all()
  # Every head reads the pooled embedding.
  p = jax.tree.map(np.asarray, pure(model))
  head = lambda name: out['embedding'] @ p[name]['kernel'] + p[name]['bias']
  np.testing.assert_allclose(out['basic'], head('basic_head'), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['compound'], head('compound_head'), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['intensity'], 1 / (1 + np.exp(-head('intensity_head')[:, 0])),
                             atol=1e-5)
  np.testing.assert_allclose(out['va'], np.tanh(head('va_head')), atol=1e-5)
  # Exportable: lowers to StableHLO with a symbolic batch size (no value-dependent
  # Python control flow), and the exported program runs at another batch size.
  batch = jax.export.symbolic_shape('b')[0]
  exported = jax.export.export(jax.jit(forward))(
      state, jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32))
  assert 'stablehlo' in exported.mlir_module()
  again = exported.call(state, IMAGES[1:])
  np.testing.assert_allclose(again['basic'], out['basic'][1:], atol=1e-5)


def test_student_full_size_is_vit_tiny():
  cfg = student_lib.default_config()
  abstract = nnx.eval_shape(lambda: student_lib.Student(cfg, rngs=nnx.Rngs(0)))
  n = sharding.param_count(nnx.state(abstract, nnx.Param))
  assert (cfg.encoder.width, cfg.encoder.depth, cfg.encoder.heads) == (192, 12, 3)
  assert 5.0e6 < n < 6.0e6, n  # ViT-Ti is ~5.7M parameters
  with pytest.raises(ValueError, match="pool='none'"):
    student_lib.Student(student_lib.default_config(encoder=dict(pool='none')), rngs=nnx.Rngs(0))


def test_conv_stem_is_strided_convs_layernorm_gelu_then_the_patch_embedding():
  """A 2-conv stem (patch 4) against a hand-written numpy pass: 3x3 stride-2 'SAME'
  correlations (XLA pads 0 before, 1 after on even sizes), LayerNorm, erf-GELU per conv,
  then the patch embedding per position in row-major order, plus cls and positions."""
  from scipy.special import erf
  cfg = tiny(patch_size=4, stem='conv', stem_channels=(5, 6), variant='vit')
  model = model_util.random_module(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)), seed=3, scale=0.5)
  p = jax.tree.map(np.asarray, pure(model))
  x = IMAGES.astype(np.float64)
  for k in range(2):
    kernel, norm = p['stem']['kernels'][k], p['stem']['norms'][k]
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    y = np.zeros((b, h // 2, w // 2, kernel.shape[-1]))
    for i in range(3):
      for j in range(3):
        y += padded[:, i:i + h - 1:2, j:j + w - 1:2] @ kernel[i, j]
    mean, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    y = (y - mean) / np.sqrt(var + cfg.layer_norm_eps) * norm['scale'] + norm['bias']
    x = 0.5 * y * (1 + erf(y / np.sqrt(2)))
  tokens = x.reshape(2, 64, 6) @ p['patch_embed']['kernel'] + p['patch_embed']['bias']
  cls = np.broadcast_to(p['cls_token'], (2, 1, 32))
  expected = np.concatenate([cls, tokens], 1) + p['pos_embed']
  got = np.asarray(jax.jit(lambda m, im: m.embed(im))(model, IMAGES))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  assert run(model)[0].shape == (2, 65, 32)
  axes = sharding.logical_axes(nnx.state(model, nnx.Param))
  assert tuple(axes['stem']['kernels'][0]) == (None, None, 'stem', 'stem')
  assert tuple(axes['patch_embed']['kernel']) == ('patch', 'embed')


def test_conv_stem_config_errors():
  with pytest.raises(ValueError, match=r'stem_channels=\(8,\).*patch_size=8'):
    vit.ViT(tiny(stem='conv', stem_channels=(8,)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="vit.stem='hybrid'"):
    vit.ViT(tiny(stem='hybrid'), rngs=nnx.Rngs(0))
