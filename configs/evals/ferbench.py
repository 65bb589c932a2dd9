r"""FERBench (UniFER, arXiv 2511.00389) as published: the four item files, the fixed
prompt, greedy decoding, the reference label extraction; accuracy (weighted and mean
over classes), macro P/R/F1 and the confusion matrix per subset.

  unifer eval --config configs/evals/ferbench.py:/data/fer,/work/shared/ferbench \
      --workdir W/instruct

Arg: IMAGE_ROOT[,ITEMS_DIR]. IMAGE_ROOT holds the datasets as the item paths name
them (IMAGE_ROOT/RAF-DB/aligned/test_0001_aligned.jpg, IMAGE_ROOT/FERPlus/test/...,
IMAGE_ROOT/AffectNet/Manually_Annotated/validation/..., IMAGE_ROOT/SFEW-2.0/Val/...);
ITEMS_DIR holds rafdb_qa.json, ferplus_qa.json, affectnet_qa.json, sfew_2.0_qa.json
(default /work/shared/ferbench). Items whose image is absent are listed (NAME_missing_
images.txt) and skipped; a subset with no image at all fails with a message naming
where it looked, and the other subsets still run.
Expected: no number measured here (the images are licensed and not on this machine).
Published for comparison (DATASETS.md): GPT-4V zero-shot RAF-DB 75.81, FERPlus 64.25,
SFEW 57.24, AffectNet-8 42.77; UniFER-7B overall 68.84.
"""

import ml_collections

from unifer_jax.evaluators import ferbench


def get_config(arg: str = ''):
  root, _, items = (arg or '').partition(',')
  c = ml_collections.ConfigDict()
  # think + answer; raise max_new_tokens for big LLMs.
  c.evals = ferbench.evals_config(root, items or '/work/shared/ferbench', max_new_tokens=128)
  return c
