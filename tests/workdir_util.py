"""A tiny instruct-stage training workdir (the full model), saved the way the trainer
saves it: for the evaluator, `unifer predict` and `unifer serve --backend full` tests.

``instruct_workdir(root)`` writes a 120-face corpus (``root/data``), its BPE
(``root/tok``) and ``root/instruct``: config.json (written as the trainer writes it:
the tokenizer copied in, ``../data`` relative) + two checkpoints of the tiny preset
(steps 1 and 2, two random initialisations; LoRA adapters of rank ``lora_rank``, 0 =
none; the input at its first batch). ``ferbench_items(workdir)`` writes the corpus' test
faces as a FERBench item file."""

from pathlib import Path

import jax
import numpy as np

from unifer_jax import config_lib, sharding, workdirs

REPO = Path(__file__).resolve().parents[1]


def _random_leaf(path, a, rng):
  name = str(getattr(path[-1], 'key', path[-1]))
  if a.shape == () and np.issubdtype(a.dtype, np.integer):
    return np.asarray(0, a.dtype)                     # step / optimizer counts
  if 'opt_state' in str(path[0]):
    return np.zeros(a.shape, a.dtype)
  if name == 'temp':
    return np.asarray(0.07, a.dtype)
  if name == 'scale':
    return np.ones(a.shape, a.dtype)
  return (rng.normal(size=a.shape) * 0.05).astype(a.dtype)


def instruct_workdir(root: Path, lora_rank: int = 2) -> dict:
  from data_prep import synthetic_faces as sf
  from unifer_jax.data import tokenizer as tok_lib
  from unifer_jax.train import checkpoint as ckpt_lib, state as state_lib
  sf.prepare(root / 'data', size=120, seed=0, image_size=32, workers=1, samples=False)
  tok_lib.train_for_datasets(['synthetic_faces'], root / 'tok', data_dir=str(root / 'data'),
                             vocab_size=512)
  config = config_lib.load(str(REPO / 'configs/instruct.py:tiny'), [
      f'--config.input.data_dir={root / "data"}', f'--config.input.tokenizer={root / "tok"}',
      '--config.input.seq_len=96', '--config.input.text_len=48',
      '--config.model.llm.vocab_size=512', '--config.model.qformer.vocab_size=512',
      '--config.model.llm.max_seq_len=320', f'--config.model.lora.rank={lora_rank}',
      '--config.checkpoint.async_save=False'])
  w = root / 'instruct'
  workdirs.save_config(config, w)    # as the trainer writes it: the tokenizer copied in
  setup = state_lib.build(config, sharding.make_mesh(config.mesh))
  ckpt = ckpt_lib.Checkpointer(w / 'checkpoints', config.checkpoint)
  # Random weights drawn with numpy into the model's parameter shapes: the model's own
  # init compiles for ~20 s on a loaded 2-core CPU, and these tests need two models
  # that differ, not a good initialisation.
  for step, seed in ((1, 0), (2, 1)):
    rng = np.random.default_rng(seed)
    ckpt.save(step, jax.tree_util.tree_map_with_path(
        lambda path, a: _random_leaf(path, a, rng), setup.abstract_state),
        {'input': {'position': 0}}, {}, force=True)
  ckpt.close()
  return dict(root=root, workdir=w, config=config, setup=setup)


def ferbench_items(workdir: dict) -> dict:
  """The corpus' test faces as a FERBench-format item file + PNGs under ROOT/ferbench:
  {'items': path, 'image_root': folder, 'n': items}."""
  import json  # pylint: disable=g-import-not-at-top
  from unifer_jax.evaluators import data as eval_data, eval_sets, model_io
  model = model_io.load(workdir['workdir'], 1)
  split = eval_data.load_split(model.input_cfg, 'test', model.image_size)
  out = workdir['root'] / 'ferbench'
  path = eval_sets.write_ferbench_items(split, str(out), 'rafdb')
  return dict(items=path, image_root=str(out), n=len(json.loads(Path(path).read_text())))
