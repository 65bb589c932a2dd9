"""The composed UniFER model: image -> ViT -> Q-Former -> projection -> LLM prefix.

Besides the generative path it holds the BLIP-2 stage-1 heads (ITC projections and
temperature, ITM head) and the ``vision`` stage's label head, unless
``stage1_heads=False`` (a Hugging Face BLIP-2 / InstructBLIP has none of them:
``convert.vlm`` builds it so); the Q-Former carries its own ITG head. Which parts train
in a stage is config (``config.freeze``), not code.

An instruction-aware Q-Former (InstructBLIP, ``qformer.instruction_aware``) reads the
prompt beside its queries: the generative entry points then take
``qformer_input_ids`` / ``qformer_attention_mask``, the prompt in the Q-Former's own
(BERT) vocabulary.

Several images per row (few-shot prompts, video frames, packed rows): pass images
``[B, M, H, W, C]`` with ``image_mask=[B, M]``; each used image's prefix then replaces its
Q placeholder ids (``interleave.placeholder_id``) inside the text instead of going in front
of it. The design and its reasons: ``models/interleave.py``.

Clips (``model.video``): ``clip_queries(frames [B, T, H, W, C])`` runs the ViT over the
B * T frames and fuses time into one set of queries (``models/video.py``), and
``clip_inputs`` / ``generate(..., clips=True)`` put them where an image's prefix goes.
"""

from __future__ import annotations

import jax
import ml_collections
import jax.numpy as jnp
from flax import nnx

from unifer_jax.data import labels
from unifer_jax.models import interleave, layers, lora, video
from unifer_jax.models import llm as llm_lib
from unifer_jax.models.llm import LLM
from unifer_jax.models.qformer import QFormer
from unifer_jax.models.vit import ViT


class UniFER(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: the graphdef is a jit static
    v, q, l = cfg.vit, cfg.qformer, cfg.llm
    if q.encoder_width != v.width:
      raise ValueError(f'model.qformer.encoder_width={q.encoder_width} must equal '
                       f'model.vit.width={v.width}')
    common = dict(dtype=q.dtype, param_dtype=q.param_dtype, rngs=rngs)
    self.vit = ViT(v, rngs=rngs)
    # BLIP-2's ln_vision: the frozen ViT's tokens are normalised before the Q-Former.
    self.vision_norm = layers.LayerNorm(v.width, eps=1e-5, **common) \
        if cfg.get('vision_layernorm', True) else None
    # A from-scratch tower's tokens carry the expression only in WHERE a feature is
    # (brows vs mouth); the Q-Former's cross-attention starts uniform, i.e. as a global
    # average pool, which throws that away, and ITC then collapses. A per-position,
    # per-channel gain drawn N(0, 1) gives pooling a spatial readout from step 0 (first
    # order in its weights, unlike attention). Off for pretrained towers (it would
    # scramble their tokens); the demo preset turns it on.
    self.token_gain = (layers.param(rngs, nnx.initializers.normal(1.0),
                                    (self.vit.num_tokens, v.width), (None, 'embed'),
                                    layers.dtype_of(v.param_dtype))
                       if cfg.get('vision_token_gain', False) else None)
    self.qformer = QFormer(q, rngs=rngs)
    self.instruction_aware = bool(q.get('instruction_aware', False))
    if cfg.get('stage1_heads', True):
      self.vision_proj = layers.Dense(q.hidden, cfg.embed_dim, axes=('embed', 'mlp'), **common)
      self.text_proj = layers.Dense(q.hidden, cfg.embed_dim, axes=('embed', 'mlp'), **common)
      self.itm_head = layers.Dense(q.hidden, 2, axes=('embed', 'classes'), **common)
      # The `vision` stage's expression classifier on the pooled queries: 8 basic then 11
      # compound logits (it pretrains the image path where no pretrained tower exists).
      self.label_head = layers.Dense(q.hidden, len(labels.BASIC) + len(labels.COMPOUND),
                                     axes=('embed', 'classes'), **common)
      # ITC temperature, learned in BLIP-2 (clipped to [0.001, 0.5] by the loss).
      self.temp = nnx.Param(jnp.asarray(0.07, layers.dtype_of(q.param_dtype)),
                            out_sharding=(), eager_sharding=False)
    self.llm_proj = layers.Dense(q.hidden, l.hidden, axes=('embed', 'mlp'), dtype=l.dtype,
                                 param_dtype=l.param_dtype, rngs=rngs)
    self.llm = LLM(l, rngs=rngs)
    # Clips (``model.video``, models/video.py): only a clip model has the attribute, so an
    # image model's graph is what it always was.
    if cfg.get('video'):
      self.video = video.ClipFusion(cfg.video, vision_width=v.width, query_width=q.hidden,
                                    param_dtype=q.param_dtype, rngs=rngs)
    if cfg.get('lora') and cfg.lora.rank:
      lora.apply(self.llm, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, rngs=rngs)

  # -- vision side -------------------------------------------------------------------

  def image_tokens(self, images: jax.Array) -> jax.Array:
    """NHWC images -> ViT tokens [B, N, Dv] (after ln_vision)."""
    x = self.vit(images)
    x = self.vision_norm(x) if self.vision_norm is not None else x
    if self.token_gain is not None:
      x = x * self.token_gain[...].astype(x.dtype)
    return x

  def image_queries(self, images: jax.Array, qformer_input_ids=None,
                    qformer_attention_mask=None) -> jax.Array:
    """The Q-Former's learned queries after attending to the image (and, instruction-
    aware, to the prompt beside them): [B, Q, Dq]."""
    return self.token_queries(self.image_tokens(images), qformer_input_ids,
                              qformer_attention_mask)

  def token_queries(self, tokens: jax.Array, qformer_input_ids=None,
                    qformer_attention_mask=None) -> jax.Array:
    """The Q-Former's queries after attending to ``tokens`` [B, N, Dv] (an image's, or a
    clip's whole memory): [B, Q, Dq]."""
    if not self.instruction_aware:
      return self.qformer.encode_queries(tokens)
    if qformer_input_ids is None:
      raise ValueError('this UniFER has an instruction-aware Q-Former (InstructBLIP): pass '
                       'qformer_input_ids (the prompt in the Q-Former tokenizer\'s vocabulary)')
    if qformer_attention_mask is None:
      qformer_attention_mask = jnp.ones(qformer_input_ids.shape, jnp.int32)
    return self.qformer.encode_queries(tokens, instruction_ids=qformer_input_ids,
                                       instruction_mask=qformer_attention_mask)

  def prefix(self, images: jax.Array, qformer_input_ids=None,
             qformer_attention_mask=None) -> jax.Array:
    """LLM input embeddings of the image: [B, Q, D_llm]."""
    return self.llm_proj(self.image_queries(images, qformer_input_ids, qformer_attention_mask))

  # -- clips (models/video.py) --------------------------------------------------------

  def clip_queries(self, frames: jax.Array, qformer_input_ids=None,
                   qformer_attention_mask=None) -> jax.Array:
    """A clip's queries [B, Q, Dq] from its frames [B, T, H, W, C]: the ViT over all
    B * T frames in one call, then ``model.video.mode``'s fusion over time."""
    if not hasattr(self, 'video'):
      raise ValueError('this UniFER reads single images: a clip needs model.video '
                       '(models/video.py; configs/video.py sets it)')
    if frames.ndim != 5:
      raise ValueError(f'frames: expected [B, T, H, W, C], got shape {frames.shape}')
    b, t = frames.shape[:2]
    tokens = self.image_tokens(frames.reshape(b * t, *frames.shape[2:]))
    tokens = tokens.reshape(b, t, *tokens.shape[1:])                      # [B, T, N, Dv]
    if self.video.mode == 'memory':
      return self.token_queries(self.video.memory(tokens), qformer_input_ids,
                                qformer_attention_mask)
    q_ids, q_mask = interleave.per_image_instruction(qformer_input_ids, qformer_attention_mask, t)
    queries = self.token_queries(tokens.reshape(b * t, *tokens.shape[2:]), q_ids, q_mask)
    return self.video.pool_queries(queries.reshape(b, t, *queries.shape[1:]))

  def clip_inputs(self, frames, input_ids, attention_mask=None, qformer_input_ids=None,
                  qformer_attention_mask=None):
    """(inputs_embeds, attention_mask) of [clip prefix; text]: the one-image layout with
    the clip's queries as the prefix."""
    prefix = self.llm_proj(self.clip_queries(frames, qformer_input_ids, qformer_attention_mask))
    return self._prefix_then_text(prefix, input_ids, attention_mask)

  # -- generative path ---------------------------------------------------------------

  def prefixed_inputs(self, images, input_ids, attention_mask=None, qformer_input_ids=None,
                      qformer_attention_mask=None, image_mask=None):
    """(inputs_embeds, attention_mask) for the LLM: [image prefix; text] for one image per
    row (images [B, H, W, C]); the text with each image's prefix in its placeholder slots
    for several (images [B, M, H, W, C], ``image_mask`` [B, M], default all used)."""
    if images.ndim == 5:
      return self.interleaved_inputs(images, input_ids, attention_mask, qformer_input_ids,
                                     qformer_attention_mask, image_mask)
    if image_mask is not None:
      raise ValueError(f'image_mask is for several images per row (images [B, M, H, W, C]); '
                       f'got images of shape {images.shape}')
    prefix = self.prefix(images, qformer_input_ids, qformer_attention_mask)
    return self._prefix_then_text(prefix, input_ids, attention_mask)

  def _prefix_then_text(self, prefix, input_ids, attention_mask):
    text = self.llm.embed(input_ids)
    embeds = jnp.concatenate([prefix.astype(text.dtype), text], axis=1)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    mask = jnp.concatenate(
        [jnp.ones(prefix.shape[:2], attention_mask.dtype), attention_mask], axis=1)
    return embeds, mask

  def interleaved_inputs(self, images, input_ids, attention_mask=None, qformer_input_ids=None,
                         qformer_attention_mask=None, image_mask=None):
    """(inputs_embeds [B, T, D], attention_mask [B, T]) of a row holding up to M images,
    each written into its run of Q placeholder ids (``models/interleave.py``)."""
    token = interleave.placeholder_id(self.cfg)
    b, m = images.shape[:2]
    if image_mask is None:
      image_mask = jnp.ones((b, m), jnp.int32)
    q = self.cfg.qformer.num_queries
    interleave.check_if_concrete(input_ids, image_mask, token, q)
    q_ids, q_mask = interleave.per_image_instruction(qformer_input_ids, qformer_attention_mask, m)
    prefixes = self.prefix(images.reshape(b * m, *images.shape[2:]), q_ids, q_mask)
    slots = input_ids == token
    # The placeholder id need not be a row of the vocabulary: embed a valid id there.
    text = self.llm.embed(jnp.where(slots, 0, input_ids))
    embeds = interleave.merge_image_slots(text, slots, prefixes.reshape(b, m, q, -1), image_mask)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    return embeds, attention_mask

  def __call__(self, images: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array | None = None, *, qformer_input_ids=None,
               qformer_attention_mask=None, image_mask=None, segment_ids=None,
               positions=None) -> jax.Array:
    """LLM logits over [image prefix; text]: [B, Q + T, V]; with several images per row
    (images [B, M, H, W, C]) over the text with the images in their slots: [B, T, V].
    ``segment_ids`` / ``positions`` [B, T]: packed rows of several examples
    (data/packing.py; interleaved rows only)."""
    embeds, mask = self.prefixed_inputs(images, input_ids, attention_mask, qformer_input_ids,
                                        qformer_attention_mask, image_mask)
    return self.llm(inputs_embeds=embeds, attention_mask=mask, segment_ids=segment_ids,
                    positions=positions)

  # -- stage-1 heads -----------------------------------------------------------------

  def _heads(self, what: str) -> None:
    if not hasattr(self, 'itm_head'):
      raise ValueError(f'UniFER.{what}: this model has no stage-1 heads (model.stage1_heads='
                       'False, as a model loaded from BLIP-2 / InstructBLIP): ITC, ITM, the '
                       'label head and the zero-shot / retrieval evaluators need them')

  def image_embeddings(self, queries: jax.Array) -> jax.Array:
    """ITC image side: per-query normalised embeddings [B, Q, E]."""
    self._heads('image_embeddings')
    return _l2_normalize(self.vision_proj(queries))

  def text_embedding(self, text_states: jax.Array, text_mask: jax.Array | None = None):
    """ITC text side, normalised ``[B, E]``: the [CLS] (first) token's state (BLIP-2,
    whose BERT is pretrained), or with ``text_pool='mean'`` the mean over valid tokens.
    A from-scratch text encoder needs the mean: at init every caption's [CLS] state is
    nearly the same vector (its own embedding dominates a near-uniform attention), so
    ITC sees equal texts, the image side gets no gradient, and both sides stay collapsed
    (sentence-transformers pool the same way)."""
    self._heads('text_embedding')
    if self.cfg.get('text_pool', 'cls') == 'mean':
      w = (jnp.ones(text_states.shape[:2]) if text_mask is None else text_mask)
      w = w.astype(jnp.float32)[..., None]
      pooled = (text_states.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    else:
      pooled = text_states[:, 0]
    return _l2_normalize(self.text_proj(pooled))

  def label_logits(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(basic [B, 8], compound [B, 11]) logits from the mean of the image queries."""
    self._heads('label_logits')
    logits = self.label_head(self.image_queries(images).mean(axis=1)).astype(jnp.float32)
    return logits[:, :len(labels.BASIC)], logits[:, len(labels.BASIC):]

  def itm_logits(self, match_queries: jax.Array) -> jax.Array:
    """ITM: mean over queries of the 2-way head, as BLIP-2 does: [B, 2]."""
    self._heads('itm_logits')
    return self.itm_head(match_queries).astype(jnp.float32).mean(axis=1)


def generate(model: UniFER, images: jax.Array, input_ids: jax.Array,
             attention_mask: jax.Array | None = None, *, qformer_input_ids=None,
             qformer_attention_mask=None, image_mask=None, clips: bool = False,
             **kw) -> jax.Array:
  """Tokens generated after [image prefix; prompt] (``llm.generate``: ``max_new_tokens``,
  sampling, ``eos_id``...); prompts may be left- or right-padded. With images
  [B, M, H, W, C] and ``image_mask``, after the prompt with its images in their slots;
  with ``clips``, ``images`` are clips' frames [B, T, H, W, C] and the clip's queries
  are the prefix (``UniFER.clip_inputs``)."""
  if clips:
    embeds, mask = model.clip_inputs(images, input_ids, attention_mask, qformer_input_ids,
                                     qformer_attention_mask)
  else:
    embeds, mask = model.prefixed_inputs(images, input_ids, attention_mask, qformer_input_ids,
                                         qformer_attention_mask, image_mask)
  return llm_lib.generate(model.llm, inputs_embeds=embeds, attention_mask=mask, **kw)


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
