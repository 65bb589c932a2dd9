"""The recipe for real photos (configs/finetune.py) end to end, as a user runs it, on a
tiny random InstructBLIP directory and a RAF-DB fixture in the real layout:
`unifer prep` -> 30 steps of `unifer train` -> `unifer eval` under the FERBench protocol
(the published item file) -> distillation -> `unifer export`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import builders_util as u
import vlm_util
from unifer_jax.data import augment

REPO = Path(__file__).resolve().parents[1]
UNIFER = [sys.executable, '-m', 'unifer_jax.cli']
# RAF-DB's own codes: 1..7 basic, 1..11 compound; every 4th image is a test one.
BASIC_CODES = [1 + i % 7 for i in range(32)]
COMPOUND_CODES = [1 + i % 11 for i in range(22)]


def _unifer(*args, env, code=0):
  done = subprocess.run(UNIFER + list(args), cwd=REPO, env=env, capture_output=True, text=True)
  assert done.returncode == code, (f'unifer {args[0]} exited {done.returncode}:\n'
                                   f'{done.stdout[-3000:]}\n{done.stderr[-3000:]}')
  return done.stdout


def test_finetune_recipe_end_to_end(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  # -- the user's files: RAF-DB as it ships, FERBench's items, an InstructBLIP ----------
  raf = tmp_path / 'fer' / 'RAF-DB'
  for subset, codes in (('basic', BASIC_CODES), ('compound', COMPOUND_CODES)):
    base, lines = u.rafdb_fixture(str(raf), subset, codes)
    u.write(f'{base}/EmoLabel/list_patition_label.txt', '\n'.join(lines) + '\n')
  # FERBench's rafdb items name /RAF-DB/aligned/test_NNNN_aligned.jpg under the image root.
  os.symlink(raf / 'basic' / 'Image' / 'aligned', raf / 'aligned')
  hf_dir = vlm_util.instructblip_dir(tmp_path / 'instructblip')
  data, work = tmp_path / 'data', tmp_path / 'work'

  # -- prep ------------------------------------------------------------------------------
  for name in ('rafdb', 'rafdb_compound'):
    out = _unifer('prep', name, '--src', str(raf), '--out', str(data), env=env)
    assert 'train' in out

  # -- fine-tune: 30 steps ---------------------------------------------------------------
  recipe = f'configs/finetune.py:cpu,{hf_dir}'
  out = _unifer('train', '--config', recipe, '--workdir', str(work / 'finetune'),
                f'--config.input.data_dir={data}', f'--config.ferbench.image_root={tmp_path / "fer"}',
                '--config.log_every_steps=1', env=env)
  assert 'init: ' in out and 'vit' in out   # the whole VLM loaded (InitReport)
  rows = [json.loads(l) for l in (work / 'finetune' / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['loss'] for r in rows if 'loss' in r]
  assert len(losses) == 30 and all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5])   # it learns the fixture's answers
  config = json.loads((work / 'finetune' / 'config.json').read_text())
  assert config['init']['vlm'] == str(hf_dir)
  # The Q-Former's tokenizer travels inside the workdir (workdirs.save_config).
  assert config['input']['text_tokenizer'] == './text_tokenizer'
  copied = [p for p in (work / 'finetune' / 'text_tokenizer').iterdir() if p.is_file()]
  assert copied and all(p.read_bytes() == (hf_dir / 'qformer_tokenizer' / p.name).read_bytes()
                        for p in copied)

  # -- back out: the fine-tuned model, LoRA merged, as an InstructBLIP transformers loads --
  out = _unifer('convert', 'to-hf', '--src', str(work / 'finetune'), '--out', str(work / 'hf'),
                env=env)
  assert 'InstructBlipForConditionalGeneration' in out and 'LoRA merged into' in out
  _same_logits_as_transformers(work / 'finetune', work / 'hf')

  # -- FERBench: the published RAF-DB items whose images exist ------------------------------
  # The other three subsets have no image here: named as failed (exit 1), RAF-DB still runs.
  out = _unifer('eval', '--workdir', str(work / 'finetune'), env=env, code=1)
  assert "FAILED: ['ferbench_affectnet', 'ferbench_ferplus', 'ferbench_sfew']" in out
  evals = json.loads((work / 'finetune' / 'report.json').read_text())['evals']
  tests = sum(1 for i in range(1, len(BASIC_CODES) + 1) if i % 4 == 0)
  raf = evals['ferbench_rafdb']
  assert raf['n'] == tests and 0.0 <= raf['acc_weighted'] <= 1.0
  assert sum(c['support'] for c in raf['per_class'].values()) == tests
  for name in ('affectnet', 'ferplus', 'sfew'):
    assert 'images found under image_root' in evals[f'ferbench_{name}']['error']

  # -- distill the fine-tuned model into the tiny student, then export ----------------------
  mixture = "[['rafdb', 1.0], ['rafdb_compound', 1.0]]"
  _unifer('train', '--config', 'configs/distill.py:tiny', '--workdir', str(work / 'distill'),
          f'--config.distill.teacher_workdir={work / "finetune"}',
          f'--config.input.data_dir={data}', f'--config.input.mixture={mixture}',
          f'--config.input.image_mean={augment.CLIP_MEAN}',
          f'--config.input.image_std={augment.CLIP_STD}',
          '--config.total_steps=6', '--config.input.batch_size=8', env=env)
  out = _unifer('export', '--workdir', str(work / 'distill'), '--out', str(work / 'export'),
                '--format', 'onnx', env=env)
  assert (work / 'export').is_dir() and any(p.suffix == '.onnx' for p in (work / 'export').iterdir())


def _same_logits_as_transformers(workdir, hf_dir):
  """The trained UniFER (adapters applied at run time) and the exported HF model (adapters
  merged) give the same logits over [image prefix; text]."""
  import jax
  import torch
  import transformers as T
  from flax import nnx
  from unifer_jax.evaluators import model_io

  model = model_io.load(workdir)
  lora_b = [np.abs(np.asarray(v)).max() for k, v in
            jax.tree_util.tree_leaves_with_path(model.params) if 'lora_b' in jax.tree_util.keystr(k)]
  assert lora_b and max(lora_b) > 1e-4   # the adapters trained: the merge is not a no-op
  hf = T.InstructBlipForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
  r = np.random.RandomState(0)
  size, q = hf.config.vision_config.image_size, hf.config.num_query_tokens
  pixels = r.randn(2, size, size, 3).astype(np.float32)
  ids = r.randint(3, hf.config.image_token_index, (2, 9))
  q_ids = r.randint(1000, 2000, (2, 7))
  mask, q_mask = np.ones_like(ids), np.ones_like(q_ids)
  ours = np.asarray(jax.jit(lambda p: nnx.merge(model.graphdef, p)(
      pixels, ids, mask, qformer_input_ids=q_ids, qformer_attention_mask=q_mask))(model.params))
  with torch.no_grad():
    want = hf(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2).copy()),
              input_ids=torch.tensor(np.concatenate([np.full((2, q), hf.config.image_token_index),
                                                     ids], 1)),
              attention_mask=torch.ones(2, q + 9, dtype=torch.long),
              qformer_input_ids=torch.tensor(q_ids),
              qformer_attention_mask=torch.tensor(q_mask)).logits.numpy()
  assert np.abs(ours - want).max() <= 1e-4
