r"""The model presets as configs: `unifer params --config configs/models.py:7b` prints the
parameter count of each tower, built with jax.eval_shape (nothing is allocated).

  unifer params --preset tiny demo base 7b

Expected: base ~1.5B parameters (ViT-B 86M, Q-Former ~105M+, LLM ~1.24B),
7b ~7.1B (ViT-L 303M, Q-Former, Llama-2-7B 6.74B).
Args: the preset name.
"""

from unifer_jax import config_lib


def get_config(arg: str = 'tiny'):
  return config_lib.base(model=arg or 'tiny')
