"""`unifer convert from-hf | to-hf | check` on tiny random HF models saved offline: the
round trip gives a directory `from_pretrained` loads with no missing/unexpected keys and
identical outputs, bf16 stays bf16, `check` passes on a converted pair and fails on a
perturbed weight, and bad input is a named error with exit code 2, not a traceback."""

import json
import shutil
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import load_file, save_file

from unifer_jax import cli
from unifer_jax.convert import commands

RNG = np.random.default_rng(0)
IDS = RNG.integers(0, 128, (2, 9))
PIXELS = RNG.standard_normal((2, 3, 32, 32)).astype(np.float32)
QUERIES = RNG.standard_normal((2, 5, 32)).astype(np.float32)
IMAGE = RNG.standard_normal((2, 7, 24)).astype(np.float32)
# InstructBLIP's mask covers [queries; instruction]: the second instruction right-padded.
QFORMER_MASK = np.ones((2, 5 + 9), np.int64)
QFORMER_MASK[1, 5 + 6:] = 0

TOWERS = {
    'llm': (lambda: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
            T.AutoModelForCausalLM, lambda m: m(torch.tensor(IDS)).logits),
    'vision': (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=96)),
               T.AutoModel, lambda m: m(pixel_values=torch.tensor(PIXELS)).last_hidden_state),
    # OPT (BLIP-2's usual LLM): learned positions, LayerNorm, ReLU, tied lm_head.
    'opt': (lambda: T.OPTForCausalLM(T.OPTConfig(
        vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32)),
            T.AutoModelForCausalLM, lambda m: m(torch.tensor(IDS)).logits),
    'qformer': (lambda: T.Blip2QFormerModel(T.Blip2QFormerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        encoder_hidden_size=24, cross_attention_frequency=2)),
                T.Blip2QFormerModel,
                lambda m: m(query_embeds=torch.tensor(QUERIES),
                            encoder_hidden_states=torch.tensor(IMAGE)).last_hidden_state),
    'instructblip_qformer': (lambda: T.InstructBlipQFormerModel(T.InstructBlipQFormerConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=48, encoder_hidden_size=24, cross_attention_frequency=2,
        max_position_embeddings=16)),
                             T.InstructBlipQFormerModel,
                             lambda m: m(input_ids=torch.tensor(IDS),
                                         attention_mask=torch.tensor(QFORMER_MASK),
                                         query_embeds=torch.tensor(QUERIES),
                                         encoder_hidden_states=torch.tensor(IMAGE)
                                         ).last_hidden_state),
}
KIND = {'opt': 'llm', 'instructblip_qformer': 'qformer'}  # the tower kind, where not the name
LLMS = ('llm', 'opt')


def unifer(*args) -> int:
  return cli.main(['convert', *map(str, args)])


def _randomise(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if 'norm' in name.lower() else 0.0))
  return model.eval()


def _out(fn, model):
  with torch.no_grad():
    return fn(model).numpy()


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  out = {}
  for i, (name, (make, _, fn)) in enumerate(TOWERS.items()):
    model = _randomise(make(), i)
    model.save_pretrained(root / name)
    out[name] = (root / name, _out(fn, model))
  return out


@pytest.mark.parametrize('tower', list(TOWERS))
def test_round_trip_through_from_pretrained(tower, hf_dirs, tmp_path, capsys):
  src, want = hf_dirs[tower]
  _, auto_cls, fn = TOWERS[tower]
  assert unifer('from-hf', '--src', src, '--out', tmp_path / 'ours') == 0
  meta = json.loads((tmp_path / 'ours' / 'config.json').read_text())
  assert (meta['format'], meta['tower']) == ('unifer-tower', KIND.get(tower, tower))
  assert (tmp_path / 'ours' / 'params').is_dir()
  # Sharded output (a few KB per shard) for the LLM: the index must be right too.
  shard = ['--max-shard-size', '20KB'] if tower in LLMS else []
  assert unifer('to-hf', '--src', tmp_path / 'ours', '--out', tmp_path / 'back', *shard) == 0
  if tower in LLMS:
    assert len(list((tmp_path / 'back').glob('model-*.safetensors'))) > 3
  back, info = auto_cls.from_pretrained(tmp_path / 'back', output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  np.testing.assert_array_equal(_out(fn, back.eval()), want)
  log = capsys.readouterr().out
  assert f'from-hf: {src} (HF ' in log and f'to-hf: {tmp_path / "ours"} (converted ' in log


def _perturb(hf_dir, out, name):
  shutil.copytree(hf_dir, out)
  tensors = load_file(out / 'model.safetensors')
  # Random, not constant: a constant shift of a dense weight feeding a LayerNorm cancels.
  noise = np.random.default_rng(1).standard_normal(tensors[name].shape).astype(np.float32)
  tensors[name] = tensors[name] + 0.05 * noise
  save_file(tensors, out / 'model.safetensors', metadata={'format': 'pt'})
  return out


@pytest.mark.parametrize('tower,weight', [
    ('llm', 'model.layers.1.mlp.down_proj.weight'),
    ('opt', 'model.decoder.embed_positions.weight'),
    ('vision', 'encoder.layers.0.self_attn.v_proj.bias'),
    ('qformer', 'encoder.layer.1.output_query.dense.weight'),
    # the text FFN of the last layer: only the instruction's (unpadded) positions see it
    ('instructblip_qformer', 'encoder.layer.2.output.dense.weight')])
def test_check_passes_on_a_converted_pair_and_fails_on_a_perturbed_weight(
    tower, weight, hf_dirs, tmp_path, capsys):
  src, _ = hf_dirs[tower]
  assert unifer('from-hf', '--src', src, '--out', tmp_path / 'ours') == 0
  capsys.readouterr()
  assert unifer('check', '--hf', src, '--src', tmp_path / 'ours', '--atol', '1e-4') == 0
  out = capsys.readouterr().out
  assert out.rstrip().endswith('PASS')
  diff = float(out.split('max abs diff ')[1].split()[0])
  assert diff <= 1e-4
  if tower in LLMS:
    assert float(out.split('KL(HF || unifer): max ')[1].split(',')[0]) <= 1e-8
    assert 'top-1 agreement 100.0%' in out
  else:
    assert float(out.split('cosine similarity per token: min ')[1].split(',')[0]) > 0.99999

  bad = _perturb(src, tmp_path / 'perturbed', weight)
  assert unifer('check', '--hf', bad, '--src', tmp_path / 'ours') == 1
  out = capsys.readouterr().out
  assert 'FAIL: above tolerance' in out
  assert float(out.split('max abs diff ')[1].split()[0]) > 1e-3


def test_bf16_stays_bf16_unless_asked(tmp_path, capsys):
  model = _randomise(TOWERS['llm'][0](), 3).to(torch.bfloat16)
  model.save_pretrained(tmp_path / 'hf')
  assert unifer('from-hf', '--src', tmp_path / 'hf', '--out', tmp_path / 'bf16') == 0
  assert unifer('from-hf', '--src', tmp_path / 'hf', '--out', tmp_path / 'f32',
                '--dtype', 'float32') == 0
  bf16, f32 = (commands.read_tower(tmp_path / d) for d in ('bf16', 'f32'))
  assert (bf16.cfg.param_dtype, f32.cfg.param_dtype) == ('bfloat16', 'float32')
  a, b = bf16.params(), f32.params()
  leaf = lambda p: p['layers']['attn']['q']['kernel']
  assert leaf(a).dtype == ml_dtypes.bfloat16 and leaf(b).dtype == np.float32
  np.testing.assert_array_equal(leaf(a).astype(np.float32), leaf(b))
  assert unifer('to-hf', '--src', tmp_path / 'bf16', '--out', tmp_path / 'back') == 0
  written = load_file(tmp_path / 'back' / 'model.safetensors')
  original = load_file(tmp_path / 'hf' / 'model.safetensors')
  assert {v.dtype for v in written.values()} == {np.dtype(ml_dtypes.bfloat16)}
  for k, v in original.items():
    np.testing.assert_array_equal(written[k], v, err_msg=k)
  assert json.loads((tmp_path / 'back' / 'config.json').read_text())['dtype'] == 'bfloat16'


def test_errors_are_named_with_exit_code_2(hf_dirs, tmp_path, capsys, monkeypatch):
  # An unsupported architecture: the supported model types are listed.
  (tmp_path / 'gpt2').mkdir()
  (tmp_path / 'gpt2' / 'config.json').write_text('{"model_type": "gpt2"}')
  assert unifer('from-hf', '--src', tmp_path / 'gpt2', '--out', tmp_path / 'x') == 2
  err = capsys.readouterr().err
  assert "unsupported model_type 'gpt2'; supported:" in err
  assert all(t in err for t in ('llama', 'qwen2', 'opt', 'clip', 'siglip', 'vit', 'bert',
                                 'blip-2', 'instructblip_qformer', 'instructblip'))
  assert 'Traceback' not in err

  # Missing, unexpected and mis-shaped tensors: all named at once, shapes given.
  bad = tmp_path / 'bad'
  shutil.copytree(hf_dirs['llm'][0], bad)
  tensors = load_file(bad / 'model.safetensors')
  del tensors['model.layers.0.mlp.up_proj.weight']
  tensors['model.layers.0.extra.weight'] = np.zeros(3, np.float32)
  tensors['model.norm.weight'] = np.ones(65, np.float32)
  save_file(tensors, bad / 'model.safetensors', metadata={'format': 'pt'})
  assert unifer('from-hf', '--src', bad, '--out', tmp_path / 'y') == 2
  err = capsys.readouterr().err
  assert 'missing (1): model.layers.0.mlp.up_proj.weight' in err
  assert 'unexpected (1): model.layers.0.extra.weight' in err
  assert 'shape mismatch model.norm.weight: expected (64,), found (65,)' in err
  assert not (tmp_path / 'y').exists()

  # A directory that is neither kind, an occupied --out, a tower HF cannot hold.
  assert unifer('to-hf', '--src', tmp_path / 'nothing', '--out', tmp_path / 'z') == 2
  assert 'nothing/config.json: not found' in capsys.readouterr().err
  assert unifer('from-hf', '--src', hf_dirs['llm'][0], '--out', bad) == 2
  assert 'exists and is not empty' in capsys.readouterr().err

  # A converted directory whose config.json no longer matches its params: named before
  # anything is read.
  assert unifer('from-hf', '--src', hf_dirs['llm'][0], '--out', tmp_path / 'l') == 0
  meta = json.loads((tmp_path / 'l' / 'config.json').read_text())
  meta['config']['mlp_dim'] += 1
  (tmp_path / 'l' / 'config.json').write_text(json.dumps(meta))
  assert unifer('to-hf', '--src', tmp_path / 'l', '--out', tmp_path / 'lb') == 2
  err = capsys.readouterr().err
  assert 'l/params (orbax params): the checkpoint does not match' in err
  assert 'shape mismatch' in err and 'Traceback' not in err

  # check compares like with like, and needs torch (the reference) -- said, exit 2.
  assert unifer('from-hf', '--src', hf_dirs['vision'][0], '--out', tmp_path / 'v') == 0
  assert unifer('check', '--hf', hf_dirs['llm'][0], '--src', tmp_path / 'v') == 2
  assert "holds a 'llama' model, --src" in capsys.readouterr().err
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError
  assert unifer('check', '--hf', hf_dirs['vision'][0], '--src', tmp_path / 'v') == 2
  err = capsys.readouterr().err
  assert 'torch is not importable' in err and "pip install -e '.[test]'" in err


def test_leaf_groups_cut_at_the_byte_budget_and_keep_a_big_leaf_alone():
  leaf = lambda n: np.zeros(n, np.uint8)
  flat = {'a': leaf(40), 'b': leaf(50), 'c': leaf(200), 'd': leaf(10), 'e': leaf(90)}
  assert commands.leaf_groups(flat, max_bytes=100) == [['a', 'b'], ['c'], ['d', 'e']]
