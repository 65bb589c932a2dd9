r"""Stage 0 (optional): text-only pretraining of the LLM on the corpus's captions and
instruction texts. Real runs load an HF LLM instead (`--config.init.llm=HF_DIR`).

  unifer train --config configs/lm.py:demo --workdir W/lm \
      --config.input.data_dir=W/data --config.input.tokenizer=W/tokenizer

Expected (demo preset, 2-core CPU, ~1 min): token loss from ~7.6 (ln 2048) to ~1.
Packed rows (``--config.input.pack=True --config.input.batch_size=16``: 16 rows of 192
tokens, ~71 texts each step; data/packing.py) are off until the demo's figures are checked
with them: 95 % of the tokens real instead of 42 %, 2.08x text tokens per second of step
(benchmarks/data_pipeline.py, 2026-12-07).
Args: the model preset (default demo).
"""

from unifer_jax import config_lib


def get_config(arg: str = 'demo'):
  c = config_lib.stage_config('lm', arg or 'demo', steps=150, batch_size=32, peak_lr=3e-3,
                              freeze=config_lib.NOT_LLM)
  c.input.seq_len = 96
  return c
