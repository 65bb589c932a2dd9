"""The distill stage on the shared step: the teacher is read from an instruct-style
workdir (config.json + orbax checkpoint + tokenizer) as a frozen step input, never part
of the train state; the loss's KL term equals one computed by hand from the scorer's
distributions; a few steps on a fixed batch lower the loss."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from unifer_jax import config_lib, sharding
from unifer_jax.data import instructions, labels
from unifer_jax.data import tokenizer as tok_lib
from unifer_jax.evaluators import likelihood
from unifer_jax.models import presets
from unifer_jax.models.unifer import UniFER
from unifer_jax.train import checkpoint as ckpt_lib
from unifer_jax.train import distill_losses, losses, optim, teacher_targets
from unifer_jax.train import state as state_lib, step as step_lib

import model_util

REPO_CONFIGS = __import__('pathlib').Path(__file__).resolve().parents[1] / 'configs'
B = 8


@pytest.fixture(scope='module')
def teacher_workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp('teacher')
  texts = instructions.template_texts() + [f'<answer>{n}</answer>' for n in
                                           labels.BASIC + labels.COMPOUND]
  tok_lib.train(texts * 2, root / 'tokenizer', vocab_size=600)
  model_cfg = presets.get('tiny')
  model_cfg.llm.vocab_size = 640
  model_cfg.llm.max_seq_len = 128
  model_cfg.lora.rank = 2
  cfg = config_lib.base(model=model_cfg)
  cfg.input.tokenizer = str(root / 'tokenizer')
  (root / 'instruct').mkdir()
  (root / 'instruct' / 'config.json').write_text(config_lib.to_json(cfg))
  model = model_util.random_module(lambda: UniFER(model_cfg, rngs=nnx.Rngs(0)), seed=5)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ckpt = ckpt_lib.Checkpointer(root / 'instruct' / 'checkpoints', cfg.checkpoint)
  ckpt.save(7, {'step': np.int32(7), 'params': params, 'opt_state': {}}, {}, {}, force=True)
  ckpt.close()
  return root, params


@pytest.fixture(scope='module')
def setup_and_teacher(teacher_workdir):
  root, _ = teacher_workdir
  config = config_lib.load(str(REPO_CONFIGS / 'distill.py') + ':tiny', [
      f'--config.distill.teacher_workdir={root / "instruct"}', '--config.input.batch_size=8',
      '--config.total_steps=10', '--config.distill.weights.ce_basic=0.0',
      '--config.distill.weights.ce_compound=0.0'])
  config.model.feature_dim = 16   # the tiny teacher's embed_dim: feature loss on
  config.distill.weights.feature = 0.5
  config.distill.feature_target = 'embedding'
  # One device: the sharded step is tested elsewhere; compiling for 8 costs ~3x here.
  setup = state_lib.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  return setup, setup.teacher.load()


def _batch():
  rng = np.random.default_rng(0)
  expression = np.array([0, 1, 2, 3, -1, -1, 5, 7], np.int32)
  return {'image': rng.standard_normal((B, 32, 32, 3)).astype(np.float32),
          'expression': expression,
          'compound': np.where(expression < 0, np.array([0, 1, 2, 3, 4, 5, 6, 7]), -1).astype(np.int32),
          'intensity': rng.uniform(0, 1, B).astype(np.float32),
          'valence': np.where(np.arange(B) == 2, np.nan, rng.uniform(-1, 1, B)).astype(np.float32),
          'arousal': rng.uniform(-1, 1, B).astype(np.float32)}


def test_teacher_is_a_frozen_input_not_state(setup_and_teacher, teacher_workdir):
  setup, inputs = setup_and_teacher
  _, saved = teacher_workdir
  assert 'encoder' in setup.abstract_state['params']           # the state is the student's
  assert not any(k in setup.abstract_state['params'] for k in ('vit', 'llm', 'qformer'))
  for path, value in optim.flat(saved).items():                # the teacher as saved
    np.testing.assert_array_equal(np.asarray(optim.flat(inputs['params'])[path]), value)
  assert set(inputs['prompts']) == {'basic', 'compound'}


def test_kl_matches_the_scorer_and_steps_lower_the_loss(setup_and_teacher):
  setup, inputs = setup_and_teacher
  batch = _batch()
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  compiled = step_lib.compile_step(setup, losses.get('distill'), spec)
  # A random student (setup.init_state's jitted initialiser would cost ~6 CPU-s more).
  student = model_util.random_module(
      lambda: state_lib.model_class(setup.model_cfg)(setup.model_cfg, rngs=nnx.Rngs(0)), scale=0.1)
  params = nnx.to_pure_dict(nnx.state(student, nnx.Param))
  state = {'step': jax.numpy.zeros((), jax.numpy.int32), 'params': params,
           'opt_state': setup.tx.init(params)}

  @jax.jit
  def reference(student_params, teacher_inputs, images):
    teacher = setup.teacher.bind(teacher_inputs)
    p = likelihood.label_distributions(teacher, images,
                                       {'basic': teacher_inputs['prompts']['basic']})['basic']
    logits = state_lib.bind(setup.graphdef, student_params)(images)['basic']
    return p, jax.nn.log_softmax(logits)

  # By hand: KL(p_teacher || softmax(student logits)) on rows with a basic label.
  p, q = (np.asarray(x, np.float64) for x in reference(state['params'], inputs, batch['image']))
  has = batch['expression'] >= 0
  want_kl = (p * (np.log(p) - q)).sum(-1)[has].mean()

  losses_seen = []
  for _ in range(6):
    state, metrics = compiled(state, batch, jax.random.key(0), inputs)
    metrics = jax.device_get(metrics)
    losses_seen.append(float(metrics['loss']))
    if len(losses_seen) == 1:
      np.testing.assert_allclose(metrics['kl_basic'], want_kl, rtol=1e-4)
      assert metrics['finite'] and np.isfinite(metrics['va_mse'])
      assert 0 <= metrics['feature'] <= 2
  assert losses_seen[-1] < losses_seen[0]


def test_teacher_workdir_errors_are_clear(tmp_path):
  config = config_lib.load(str(REPO_CONFIGS / 'distill.py') + ':tiny')
  with pytest.raises(ValueError, match='teacher_workdir is empty'):
    state_lib.build(config, sharding.make_mesh(config.mesh))
  config.distill.teacher_workdir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='no config.json'):
    state_lib.build(config, sharding.make_mesh(config.mesh))


def test_feature_head_must_match_the_teacher_feature(teacher_workdir):
  root, _ = teacher_workdir
  config = config_lib.load(str(REPO_CONFIGS / 'distill.py') + ':tiny', [
      f'--config.distill.teacher_workdir={root / "instruct"}',
      '--config.distill.weights.feature=1.0', '--config.model.feature_dim=16'])
  # The tiny teacher's prefix is 4 queries x 32: 128 values, not its 16-d ITC embedding.
  with pytest.raises(ValueError, match=r"feature_target='prefix'.*feature_dim must be 128"):
    state_lib.build(config, sharding.make_mesh(config.mesh))
  config.distill.feature_target = 'pixels'
  with pytest.raises(ValueError, match="feature_target='pixels'; expected one of"):
    state_lib.build(config, sharding.make_mesh(config.mesh))


def test_prefix_feature_loss_is_the_mean_squared_error():
  rng = np.random.default_rng(1)
  target = rng.standard_normal((3, 4, 5)).astype(np.float32)
  student = rng.standard_normal((3, 20)).astype(np.float32)
  want = ((student.reshape(3, 4, 5) - target) ** 2).mean()
  got = distill_losses.feature_loss(student, target, 'prefix')
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # 'embedding' is direction only: a scaled copy of the target costs nothing.
  np.testing.assert_allclose(distill_losses.feature_loss(3 * student, student, 'embedding'), 0,
                             atol=1e-6)


@pytest.fixture(scope='module')
def cached_config(teacher_workdir):
  from data_prep import synthetic_faces as sf
  root, _ = teacher_workdir
  sf.prepare(root / 'data', size=40, seed=0, image_size=32, workers=1, samples=False)
  return config_lib.load(str(REPO_CONFIGS / 'distill.py') + ':tiny', [
      f'--config.distill.teacher_workdir={root / "instruct"}', '--config.input.batch_size=8',
      f'--config.input.data_dir={root / "data"}', '--config.input.augment.enabled=False',
      '--config.distill.targets=cached', '--config.total_steps=4',
      '--config.checkpoint.every_steps=2', '--config.checkpoint.async_save=False',
      # the demo's feature loss: the teacher's prefix, 4 queries x 32 for the tiny teacher
      '--config.distill.weights.feature=1.0', '--config.model.feature_dim=128'])


def test_cached_targets_are_the_online_teachers_scores(cached_config, tmp_path, capsys):
  from unifer_jax.data import inputs as inputs_lib
  config = cached_config
  table = teacher_targets.load_or_compute(config, tmp_path)
  assert (tmp_path / teacher_targets.FILE).is_file()
  assert np.isfinite(table['basic']).any() and np.isfinite(table['compound']).any()
  # Every record is scored for exactly the label kinds it has.
  from unifer_jax.data import sources
  src = sources.open_split(config.input.name, config.input.split, config.input.data_dir)
  labels_of = np.array([[src[i]['expression'], src[i]['compound']] for i in range(len(src))])
  np.testing.assert_array_equal(np.isfinite(table['basic']).all(1), labels_of[:, 0] >= 0)
  np.testing.assert_array_equal(np.isfinite(table['compound']).all(1), labels_of[:, 1] >= 0)
  # The train input's rows carry their own records' scores: recompute them online.
  setup = state_lib.build(config.copy_and_resolve_references(), sharding.make_mesh(
      config.mesh, jax.devices()[:1]))
  data = teacher_targets.CachedTargetsInput(inputs_lib.make_input(config, setup.model_cfg), table)
  batch = data.next_local_batch()
  assert set(data.batch_spec()) == set(batch)
  online_cfg = config.copy_and_resolve_references()
  online_cfg.distill.targets = 'online'
  teacher = state_lib.build(online_cfg, sharding.make_mesh(config.mesh, jax.devices()[:1])).teacher
  inputs = teacher.load()
  logits = jax.jit(lambda inp, x: likelihood.label_log_likelihoods(
      teacher.bind(inp), x, inp['prompts']))(inputs, batch['image'])
  for task, key in (('basic', 'expression'), ('compound', 'compound')):
    has = batch[key] >= 0
    assert has.any(), task
    np.testing.assert_allclose(batch[f'teacher_{task}'][has], np.asarray(logits[task])[has],
                               rtol=1e-4, atol=1e-4)
  # ... and their records' teacher prefix, standardised per token (float16 in the table).
  feature = jax.jit(lambda inp, x: distill_losses.teacher_feature(
      teacher.bind(inp), teacher.bind(inp).image_queries(x), 'prefix'))(inputs, batch['image'])
  assert table['feature'].shape == (len(src), 4, 32) and table['feature'].dtype == np.float16
  np.testing.assert_allclose(batch['teacher_feature'], np.asarray(feature), atol=4e-3)
  np.testing.assert_allclose(np.asarray(feature).std(-1), 1.0, rtol=1e-3)
  # A second run reads the table back instead of scoring again.
  capsys.readouterr()
  again = teacher_targets.load_or_compute(config, tmp_path)
  assert f'teacher targets: {tmp_path / teacher_targets.FILE}' in capsys.readouterr().out
  np.testing.assert_array_equal(again['basic'], table['basic'])
  # A table from another teacher checkpoint is not reused.
  path = tmp_path / teacher_targets.FILE
  with np.load(path) as stored:
    fields = {k: stored[k] for k in stored.files}
  fields['id_teacher_step'] = np.asarray(-1)
  np.savez(path, **fields)
  teacher_targets.load_or_compute(config, tmp_path)
  out = capsys.readouterr().out
  assert "'teacher_step': -1" in out and 'recomputing' in out and 'teacher targets: batch' in out
  # ... nor one for another feature: without the feature loss the table holds none.
  plain = config.copy_and_resolve_references()
  plain.distill.weights.feature = 0.0
  assert 'feature' not in teacher_targets.load_or_compute(plain, tmp_path)
  assert "'feature': 'prefix'" in capsys.readouterr().out


def test_cached_distill_trains_and_resumes(cached_config, tmp_path, capsys):
  from unifer_jax.train import loop
  last = loop.train(cached_config, tmp_path)
  assert last['step'] == 4 and np.isfinite(last['loss']) and 'agree_basic' in last
  assert np.isfinite(last['feature'])   # the prefix regression ran on the cached features
  assert (tmp_path / teacher_targets.FILE).is_file()
  longer = cached_config.copy_and_resolve_references()
  longer.total_steps = 6
  capsys.readouterr()
  last = loop.train(longer, tmp_path)   # resumes at 4 with the table it wrote
  out = capsys.readouterr().out
  assert 'resumed from checkpoint step 4' in out and 'teacher targets: ' in out
  assert 'batch ' not in out            # no scoring progress: the table was read back
  assert last['step'] == 6 and np.isfinite(last['loss'])


def test_cached_targets_refuse_augmented_views_but_flips(cached_config, tmp_path):
  config = cached_config.copy_and_resolve_references()
  config.input.augment.enabled = True        # the defaults: colour jitter, occlusion, flips
  with pytest.raises(ValueError, match='augment.enabled=False or flips'):
    teacher_targets.load_or_compute(config, tmp_path)
  config_lib.flip_only(config)
  teacher_targets.check_config(config)       # a mirror image keeps the stored face's label
  config.input.augment.crop_scale = (0.75, 1.0)
  with pytest.raises(ValueError, match='crops, colour and occlusion'):
    teacher_targets.check_config(config)


def test_the_demo_distill_export_report_on_a_tiny_teacher(cached_config, teacher_workdir,
                                                          tmp_path):
  """``unifer demo``'s last mile (distill_demo.py) end to end: trains, exports with parity,
  and reports agreement, its bounds and the speeds from the same held-out faces."""
  from unifer_jax import distill_demo
  root, _ = teacher_workdir
  for part in ('instruct', 'data'):   # the demo's workdir layout, on the tiny teacher
    (tmp_path / part).symlink_to(root / part)
  student = dict(image_size=32, patch_size=16, width=32, depth=1, heads=2, mlp_dim=64)
  overrides = [f'--config.model.encoder.{k}={v}' for k, v in student.items()] + [
      '--config.model.feature_dim=128', '--config.total_steps=4', '--config.input.batch_size=8',
      '--config.checkpoint.async_save=False']
  report = distill_demo.run_distill_and_export(tmp_path, overrides, batch=8)
  n = report['student_teacher_n']
  cm = np.asarray(report['student_confusion'])
  assert n > 0 and cm.sum() == n
  np.testing.assert_allclose(report['student_basic_acc'], np.trace(cm) / n)
  assert report['onnx_max_abs_diff'] <= 1e-4 and report['student_speedup'] > 0
  # f32 and int8 ONNX timed on the same batch (the speed batch), both measured.
  assert report['student_onnx_ms_per_image'] > 0 and report['int8_ms_per_image'] > 0
  for key in ('student_teacher_agreement', 'teacher_mirror_consistency',
              'onnx_teacher_agreement', 'int8_teacher_agreement'):
    assert 0.0 <= report[key] <= 1.0, key
  # The teacher asked in each of its other trained wordings of the basic question.
  assert 0.0 <= report['teacher_reworded_agreement_min'] <= report[
      'teacher_reworded_agreement'] <= 1.0
  assert len(instructions.prompt_variants('basic')) > 1
  table = distill_demo.markdown(report)
  assert 'other trained wordings (mean / min) | n/a' not in table
  assert (tmp_path / 'student_basic_confusion.png').is_file()
