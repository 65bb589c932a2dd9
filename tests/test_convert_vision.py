"""HF ViT / CLIP / SigLIP / BLIP-2 / InstructBLIP vision checkpoints -> ViT parity, the to-HF
round trip, errors.

The references are tiny random transformers (torch) models built offline; every weight
(norms included) is perturbed away from its init so a swapped or dropped tensor shows.
"""

import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from safetensors.numpy import load_file, save_file

from unifer_jax import cli, convert
from unifer_jax.convert import commands, compose, hf_io, vision
from unifer_jax.models import presets, vit
from unifer_jax.models.unifer import UniFER

VISION = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=128)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
PIXELS = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)  # NHWC


def _perturb(model):
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


HF_MODELS = {
    'vit': lambda: T.ViTModel(T.ViTConfig(**VISION)),
    'vit_classifier': lambda: T.ViTForImageClassification(T.ViTConfig(**VISION, num_labels=3)),
    'clip_vision_model': lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**VISION)),
    'clip': lambda: T.CLIPModel(T.CLIPConfig(vision_config=VISION, text_config=TEXT)),
    'siglip_vision_model': lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**VISION)),
    'siglip_no_head': lambda: T.SiglipVisionModel(
        T.SiglipVisionConfig(**VISION, vision_use_head=False)),
    'siglip': lambda: T.SiglipModel(T.SiglipConfig(vision_config=VISION, text_config=TEXT)),
    'vit_no_pooler': lambda: T.ViTModel(T.ViTConfig(**VISION), add_pooling_layer=False),
    'blip2': lambda: T.Blip2VisionModel(T.Blip2VisionConfig(**VISION)),
    'blip2_no_qkv_bias': lambda: T.Blip2VisionModel(T.Blip2VisionConfig(**VISION, qkv_bias=False)),
    'instructblip': lambda: T.InstructBlipVisionModel(T.InstructBlipVisionConfig(**VISION)),
}


def vision_tower(name, model):
  """The HF module whose outputs ours must match."""
  return {'clip': lambda m: m.vision_model, 'siglip': lambda m: m.vision_model,
          'vit_classifier': lambda m: m.vit}.get(name, lambda m: m)(model)


@functools.cache
def hf_checkpoint(name, tmp_root):
  """(directory, last_hidden_state, pooler_output) of a saved tiny HF model."""
  torch.manual_seed(0)
  model = _perturb(HF_MODELS[name]())
  out_dir = f'{tmp_root}/{name}'
  model.save_pretrained(out_dir)
  with torch.no_grad():
    out = vision_tower(name, model)(pixel_values=torch.from_numpy(PIXELS.transpose(0, 3, 1, 2)))
  pooled = None if out.pooler_output is None else out.pooler_output.numpy()
  return out_dir, out.last_hidden_state.numpy(), pooled


@pytest.fixture(scope='module')
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('hf'))


@functools.cache
def _forward(graphdef):
  @jax.jit
  def forward(state, images):
    m = nnx.merge(graphdef, state)
    hidden = m(images)
    return hidden, (None if m.cfg.pool == 'none' else m.pool(hidden))
  return forward


def run(model):
  graphdef, state = nnx.split(model)
  return jax.tree.map(np.asarray, _forward(graphdef)(state, PIXELS))


@pytest.mark.parametrize('name,scan', [
    ('vit', True), ('vit_classifier', False), ('clip_vision_model', True), ('clip', False),
    ('siglip_vision_model', True), ('siglip_no_head', True), ('siglip', True),
    ('vit_no_pooler', False), ('blip2', True), ('blip2', False), ('blip2_no_qkv_bias', True),
    ('instructblip', True), ('instructblip', False)])
def test_parity_with_hf(name, scan, tmp_root):
  hf_dir, want_hidden, want_pooled = hf_checkpoint(name, tmp_root)
  model = convert.load_hf(hf_dir, scan_layers=scan)
  assert isinstance(model, vit.ViT)
  hidden, pooled = run(model)
  assert hidden.shape == want_hidden.shape
  err = np.abs(hidden - want_hidden).max()
  assert err <= (1e-5 if model.cfg.variant == 'blip2' else 1e-4), (name, err)
  if want_pooled is None and model.cfg.variant == 'siglip':  # no head: no pooled output
    assert model.cfg.pool == 'none' and pooled is None
  elif want_pooled is None:  # ViTFor... has no pooler; ours pools the cls token (as its head)
    np.testing.assert_array_equal(pooled, hidden[:, 0])
  else:  # ViTModel pooler / CLIP, BLIP-2 post_layernorm(cls) / SigLIP MAP head
    assert np.abs(pooled - want_pooled).max() <= 1e-4, name
  # The comparison is not vacuous: the outputs are far from zero.
  assert np.abs(want_hidden).max() > 0.5


def test_layouts_and_what_is_skipped(tmp_root, caplog):
  caplog.set_level('INFO')
  hf_dir, _, _ = hf_checkpoint('clip', tmp_root)
  cfg = vision.config_from_hf(hf_io.read_hf_config(hf_dir))
  assert (cfg.variant, cfg.pool, cfg.act, cfg.width, cfg.depth) == ('clip', 'cls', 'quick_gelu', 64, 2)
  params = vision.params_from_hf(hf_io.TensorReader(hf_dir), cfg)
  assert 'text tower is ignored' in caplog.text and "'vision_model.'" in caplog.text
  reader = hf_io.TensorReader(hf_dir)
  q = reader.get('vision_model.encoder.layers.1.self_attn.q_proj.weight')
  np.testing.assert_array_equal(params['blocks']['attn']['query']['kernel'][1], q.T)
  conv = reader.get('vision_model.embeddings.patch_embedding.weight')  # [D, C, kh, kw]
  kernel = params['patch_embed']['kernel'].reshape(8, 8, 3, 64)  # [kh, kw, C, D]
  np.testing.assert_array_equal(kernel[2, 5, 1], conv[:, 1, 2, 5])
  assert 'bias' not in params['patch_embed']  # CLIP's conv has none
  assert set(params) == {'patch_embed', 'cls_token', 'pos_embed', 'pre_norm', 'blocks', 'pool_norm'}
  siglip = vision.config_from_hf(hf_io.read_hf_config(hf_checkpoint('siglip', tmp_root)[0]))
  assert (siglip.variant, siglip.pool, siglip.act) == ('siglip', 'map', 'gelu_tanh')


def test_bf16_checkpoint_stays_bf16(tmp_path):
  torch.manual_seed(0)
  _perturb(T.SiglipVisionModel(T.SiglipVisionConfig(**VISION))).to(torch.bfloat16) \
      .save_pretrained(tmp_path)
  cfg = vision.config_from_hf(hf_io.read_hf_config(tmp_path))
  params = vision.params_from_hf(hf_io.TensorReader(tmp_path), cfg)
  dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
  assert dtypes == {'bfloat16'}


def test_older_prefixed_clip_vision_checkpoint(tmp_root, tmp_path):
  """CLIPVisionModel checkpoints from transformers 4 store ``vision_model.*``."""
  hf_dir, want_hidden, want_pooled = hf_checkpoint('clip_vision_model', tmp_root)
  tensors = load_file(f'{hf_dir}/model.safetensors')
  save_file({'vision_model.' + k: v for k, v in tensors.items()},
            str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  (tmp_path / 'config.json').write_text(open(f'{hf_dir}/config.json').read())
  hidden, pooled = run(convert.load_hf(tmp_path))
  assert np.abs(hidden - want_hidden).max() <= 1e-4
  assert np.abs(pooled - want_pooled).max() <= 1e-4


@pytest.mark.parametrize('name,hf_class', [
    ('vit', T.ViTModel), ('clip', T.CLIPVisionModel), ('siglip', T.SiglipVisionModel)])
def test_round_trip_to_hf(name, hf_class, tmp_root, tmp_path):
  hf_dir, want_hidden, want_pooled = hf_checkpoint(name, tmp_root)
  cfg = vision.config_from_hf(hf_io.read_hf_config(hf_dir))
  params = vision.params_from_hf(hf_io.TensorReader(hf_dir), cfg)
  hf_io.write_hf_dir(tmp_path, vision.hf_config_from(cfg), vision.params_to_hf(params, cfg))
  # 'clip' / 'siglip' composites come back as the vision model alone.
  written = json.loads((tmp_path / 'config.json').read_text())
  assert written['model_type'] == {'vit': 'vit', 'clip': 'clip_vision_model',
                                   'siglip': 'siglip_vision_model'}[name]
  model, info = hf_class.from_pretrained(tmp_path, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert not info['mismatched_keys'], info
  with torch.no_grad():
    out = model.eval()(pixel_values=torch.from_numpy(PIXELS.transpose(0, 3, 1, 2)))
  np.testing.assert_array_equal(out.last_hidden_state.numpy(), want_hidden)
  np.testing.assert_array_equal(out.pooler_output.numpy(), want_pooled)
  # ... and reading the written directory back gives the same parameters.
  again = vision.params_from_hf(hf_io.TensorReader(tmp_path),
                                vision.config_from_hf(hf_io.read_hf_config(tmp_path)))
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_our_own_model_to_hf_without_pooler(tmp_path):
  """A ViT trained here (no HF pooler) exports to a ViTModel with add_pooling_layer=False."""
  cfg = vit.default_config(image_size=32, patch_size=8, width=64, depth=2, heads=4,
                           mlp_dim=128, variant='vit', pool='cls', act='gelu_tanh',
                           layer_norm_eps=1e-6, scan_layers=False)
  ours = vit.ViT(cfg, rngs=nnx.Rngs(3))
  params = convert.params_of(ours)
  hf_io.write_hf_dir(tmp_path, vision.hf_config_from(cfg), vision.params_to_hf(params, cfg))
  model, info = T.ViTModel.from_pretrained(tmp_path, add_pooling_layer=False,
                                           output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  with torch.no_grad():
    out = model.eval()(pixel_values=torch.from_numpy(PIXELS.transpose(0, 3, 1, 2)))
  hidden, _ = run(ours)
  assert np.abs(hidden - out.last_hidden_state.numpy()).max() <= 1e-4
  back = vision.config_from_hf(hf_io.read_hf_config(tmp_path))
  assert not back.pooler and back.act == 'gelu_tanh' and back.layer_norm_eps == 1e-6
  with pytest.raises(hf_io.ConversionError, match="pool='map'"):
    vision.hf_config_from(vit.default_config(variant='clip', pool='map'))
  with pytest.raises(hf_io.ConversionError, match="stem='conv'"):
    vision.hf_config_from(vit.default_config(stem='conv', stem_channels=(8, 16, 32, 64)))


def test_bad_checkpoint_reports_every_problem_by_name(tmp_root, tmp_path):
  hf_dir, _, _ = hf_checkpoint('siglip_vision_model', tmp_root)
  tensors = load_file(f'{hf_dir}/model.safetensors')
  del tensors['encoder.layers.1.mlp.fc1.weight']
  del tensors['head.probe']
  tensors['encoder.layers.0.extra.weight'] = np.zeros(3, np.float32)
  tensors['encoder.layers.0.self_attn.k_proj.weight'] = np.zeros((64, 32), np.float32)
  save_file(tensors, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  (tmp_path / 'config.json').write_text(open(f'{hf_dir}/config.json').read())
  with pytest.raises(hf_io.ConversionError) as e:
    convert.load_hf(tmp_path)
  msg = str(e.value)
  assert 'missing (2): encoder.layers.1.mlp.fc1.weight, head.probe' in msg
  assert 'unexpected (1): encoder.layers.0.extra.weight' in msg
  assert ('shape mismatch encoder.layers.0.self_attn.k_proj.weight: expected (64, 64), '
          'found (64, 32)') in msg
  assert str(tmp_path) in msg


def test_bad_configs_are_named():
  with pytest.raises(hf_io.ConversionError, match="hidden_act='relu'"):
    vision.config_from_hf(dict(model_type='vit', hidden_act='relu'))
  with pytest.raises(hf_io.ConversionError, match='vision_config'):
    vision.config_from_hf(dict(model_type='clip'))
  with pytest.raises(hf_io.ConversionError, match=r'image_size=\[32, 48\]'):
    vision.config_from_hf(dict(model_type='siglip_vision_model', image_size=[32, 48]))
  # Keys an old config.json leaves out take HF's defaults.
  cfg = vision.config_from_hf(dict(model_type='clip', vision_config=dict(hidden_size=64)))
  assert (cfg.width, cfg.patch_size, cfg.image_size, cfg.act) == (64, 32, 224, 'quick_gelu')


# -- BLIP-2 / InstructBLIP: the two attention-bias forms, export, check ------------------

BLIP = {'blip2': (T.Blip2VisionModel, T.Blip2VisionConfig, 'blip_2_vision_model'),
        'instructblip': (T.InstructBlipVisionModel, T.InstructBlipVisionConfig,
                         'instructblip_vision_model')}


@functools.cache
def blip_forms(name, tmp_root):
  """(fused dir, q_bias/v_bias dir, last_hidden_state) of one model saved both ways. The
  EVA form has no key bias, so the source model's key slice of qkv.bias is zeroed first."""
  cls, config_cls, _ = BLIP[name]
  torch.manual_seed(0)
  model = _perturb(cls(config_cls(**VISION)))
  with torch.no_grad():
    for layer in model.encoder.layers:
      layer.self_attn.qkv.bias[64:128] = 0.0
  fused, split = f'{tmp_root}/{name}_fused', f'{tmp_root}/{name}_qv'
  model.save_pretrained(fused)
  with torch.no_grad():
    want = model(pixel_values=torch.from_numpy(PIXELS.transpose(0, 3, 1, 2))).last_hidden_state
  tensors = {}
  for k, v in load_file(f'{fused}/model.safetensors').items():
    if k.endswith('self_attn.qkv.bias'):  # rename into the EVA / LAVIS form
      tensors[k.replace('qkv.bias', 'q_bias')], _, tensors[k.replace('qkv.bias', 'v_bias')] = \
          np.split(v, 3)
    else:
      tensors[k] = v
  os.makedirs(split)
  save_file(tensors, f'{split}/model.safetensors', metadata={'format': 'pt'})
  shutil.copy(f'{fused}/config.json', split)
  return fused, split, want.numpy()


@pytest.mark.parametrize('name', list(BLIP))
@pytest.mark.parametrize('scan', [True, False])
def test_blip_vision_both_bias_forms_match_hf(name, scan, tmp_root):
  fused, split, want = blip_forms(name, tmp_root)
  assert 'encoder.layers.1.self_attn.v_bias' in hf_io.TensorReader(split).keys()
  models = [convert.load_hf(d, scan_layers=scan) for d in (fused, split)]
  for model in models:
    assert model.cfg.variant == 'blip2' and model.cfg.layer_norm_eps == 1e-6
    hidden, _ = run(model)
    assert np.abs(hidden - want).max() <= 1e-5
  jax.tree.map(np.testing.assert_array_equal, *map(convert.params_of, models))
  assert np.abs(want).max() > 0.5
  # transformers 5.23 itself has no rule for that form: it drops the biases, we do not.
  _, info = BLIP[name][0].from_pretrained(split, output_loading_info=True)
  assert 'encoder.layers.0.self_attn.q_bias' in info['unexpected_keys']


@pytest.mark.parametrize('name', ['blip2', 'blip2_no_qkv_bias', 'instructblip'])
def test_blip_vision_to_hf_and_round_trip(name, tmp_root, tmp_path):
  """from-hf -> to-hf is what transformers 5.23 loads; from-hf -> to-hf -> from-hf is exact;
  an EVA-form checkpoint is written back fused."""
  hf_dir, want, want_pooled = hf_checkpoint(name, tmp_root)
  cfg = vision.config_from_hf(hf_io.read_hf_config(hf_dir))
  params = vision.params_from_hf(hf_io.TensorReader(hf_dir), cfg)
  model_type = hf_io.read_hf_config(hf_dir)['model_type']
  hf_io.write_hf_dir(tmp_path / 'out', vision.hf_config_from(cfg, model_type),
                     vision.params_to_hf(params, cfg))
  cls = BLIP['instructblip' if name == 'instructblip' else 'blip2'][0]
  model, info = cls.from_pretrained(tmp_path / 'out', output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  with torch.no_grad():
    out = model.eval()(pixel_values=torch.from_numpy(PIXELS.transpose(0, 3, 1, 2)))
  assert np.abs(out.last_hidden_state.numpy() - want).max() <= 1e-5
  assert np.abs(out.pooler_output.numpy() - want_pooled).max() <= 1e-5
  written, original = (load_file(f'{d}/model.safetensors') for d in (tmp_path / 'out', hf_dir))
  assert written.keys() == original.keys()
  for k, v in original.items():
    np.testing.assert_array_equal(written[k], v, err_msg=k)
  again = vision.params_from_hf(hf_io.TensorReader(tmp_path / 'out'),
                                vision.config_from_hf(hf_io.read_hf_config(tmp_path / 'out')))
  jax.tree.map(np.testing.assert_array_equal, again, params)
  if name == 'blip2':  # the EVA form comes back fused, with a zero key bias
    _, split, want_split = blip_forms('blip2', tmp_root)
    hf_io.write_hf_dir(tmp_path / 'fused', vision.hf_config_from(cfg), vision.params_to_hf(
        vision.params_from_hf(hf_io.TensorReader(split), cfg), cfg))
    qkv_bias = load_file(tmp_path / 'fused' / 'model.safetensors')[
        'encoder.layers.1.self_attn.qkv.bias']
    assert not qkv_bias[64:128].any() and qkv_bias[:64].any() and qkv_bias[128:].any()
    with torch.no_grad():
      got = cls.from_pretrained(tmp_path / 'fused').eval()(
          pixel_values=torch.from_numpy(PIXELS.transpose(0, 3, 1, 2))).last_hidden_state
    assert np.abs(got.numpy() - want_split).max() <= 1e-5


@pytest.mark.parametrize('name', list(BLIP))
def test_unifer_convert_check_and_to_hf_on_blip_vision(name, tmp_root, tmp_path, capsys):
  hf_dir, want, _ = hf_checkpoint(name, tmp_root)
  cls, _, model_type = BLIP[name]
  assert cli.main(['convert', 'from-hf', '--src', hf_dir, '--out', str(tmp_path / 'ours')]) == 0
  assert cli.main(['convert', 'check', '--hf', hf_dir, '--src', str(tmp_path / 'ours'),
                   '--atol', '1e-5']) == 0
  out = capsys.readouterr().out
  assert f'HF {cls.__name__}' in out and out.rstrip().endswith('PASS')
  assert float(out.split('max abs diff ')[1].split()[0]) <= 1e-5
  # to-hf writes the model_type it came from (InstructBLIP's is not Blip2VisionModel).
  assert cli.main(['convert', 'to-hf', '--src', str(tmp_path / 'ours'),
                   '--out', str(tmp_path / 'back')]) == 0
  assert hf_io.read_hf_config(tmp_path / 'back')['model_type'] == model_type
  back, info = cls.from_pretrained(tmp_path / 'back', output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  with torch.no_grad():
    got = back.eval()(pixel_values=torch.from_numpy(PIXELS.transpose(0, 3, 1, 2)))
  np.testing.assert_array_equal(got.last_hidden_state.numpy(), want)


def test_vit_model_without_pooler_loads_everywhere(tmp_root, tmp_path):
  """Whether a ViTModel has its pooler is read from the tensors: config.json is the same
  with add_pooling_layer=False (architectures still says ViTModel)."""
  hf_dir, want, _ = hf_checkpoint('vit_no_pooler', tmp_root)
  hf_config = hf_io.read_hf_config(hf_dir)
  assert hf_config['architectures'] == ['ViTModel'] and 'unifer_pooler' not in hf_config
  assert vision.config_from_hf(hf_config).pooler  # config.json alone would guess wrong
  assert not convert.load_hf(hf_dir).cfg.pooler
  assert convert.load_hf(hf_checkpoint('vit', tmp_root)[0]).cfg.pooler  # one with a pooler
  # unifer convert from-hf
  tower, _ = commands.from_hf(hf_dir, tmp_path / 'ours')
  assert not tower.cfg.pooler and 'pooler' not in commands.read_tower(tmp_path / 'ours').params()
  # config.init.vision=
  init = dict(vision=str(hf_dir))
  cfg = compose.model_config_with_init(presets.get('tiny'), init)
  assert (cfg.vit.width, cfg.vit.pooler, cfg.qformer.encoder_width) == (64, False, 64)
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: UniFER(cfg, rngs=nnx.Rngs(0))),
                                      nnx.Param))
  params, report = compose.apply_init(params, init, cfg)
  assert not any(f.startswith('vit/') for f in report.fresh)
  hidden, _ = run(convert.fill(nnx.eval_shape(lambda: vit.ViT(cfg.vit, rngs=nnx.Rngs(0))),
                               params['vit']))
  assert np.abs(hidden - want).max() <= 1e-4


def test_blip2_configs_and_refusals():
  cfg = vision.config_from_hf(dict(model_type='instructblip_vision_model'))
  assert (cfg.variant, cfg.width, cfg.depth, cfg.patch_size, cfg.act, cfg.layer_norm_eps,
          cfg.num_channels, cfg.qkv_bias) == ('blip2', 1408, 39, 14, 'gelu', 1e-6, 3, True)
  tiny = dict(image_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128)
  written = vision.hf_config_from(vit.default_config(variant='blip2', qkv_bias=False, **tiny))
  assert (written['model_type'], written['architectures'], written['qkv_bias']) == \
      ('blip_2_vision_model', ['Blip2VisionModel'], False)
  assert 'num_channels' not in written
  for bad, match in [(dict(stem='conv', stem_channels=(8, 16, 32)), "stem='conv'"),
                     (dict(num_channels=1), 'num_channels=1'),
                     (dict(pooler=True), 'pooler=True'), (dict(pool='map'), "pool='map'")]:
    with pytest.raises(hf_io.ConversionError, match=f"variant 'blip2'.*{match}"):
      vision.hf_config_from(vit.default_config(variant='blip2', **{**tiny, **bad}))
  with pytest.raises(hf_io.ConversionError, match="'instructblip_vision_model' does not hold"):
    vision.hf_config_from(vit.default_config(variant='clip'), 'instructblip_vision_model')
