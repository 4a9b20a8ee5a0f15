"""Our side: the train and denoise programs of the base generator, the cascade and
adding a concept, timed (``ours_*``) or built abstractly (for counting and compiling)."""

from __future__ import annotations

import pathlib
import tempfile
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental.layout import Format, Layout

from persvid_jax import sharding as sh, xla_options
from persvid_jax import params as params_lib
from persvid_jax.bench.core import (CFG_BATCH, Row, Shapes, bench_unet_config, device_peak_bytes,
                                    median_ms, memory_of, shape_str, time_calls)
from persvid_jax.concepts import build
from persvid_jax.concepts import database as db_lib
from persvid_jax.concepts.bank import ConceptBank
from persvid_jax.diffusion import losses, schedules
from persvid_jax.models.stack import inference_params, kv_cache_fn, sr_denoise_fn
from persvid_jax.models.unet3d import UNet3D
from persvid_jax.models.video_transformer import KV_CACHE
from persvid_jax.pipeline import generate as gen
from persvid_jax.pipeline import model as model_lib
from persvid_jax.train import packing as packing_lib
from persvid_jax.train import state as state_lib
from persvid_jax.train import step as step_lib


def _program_bytes(compiled) -> int | None:
  try:
    return memory_of(compiled)["total_bytes"]
  except Exception:   # not every backend reports it
    return None


def jit_denoise(denoise: Callable, params: Any, n_inputs: int, device: jax.Device) -> Callable:
  """``denoise(params, *inputs)`` jitted for ``device`` as the rows time it: the
  project's compiler options, the params' layouts chosen by XLA (``Layout.AUTO``),
  the inputs' the default."""
  single = jax.sharding.SingleDeviceSharding(device)
  params_formats = jax.tree.map(lambda _: Format(Layout.AUTO, single), params)
  return xla_options.jit(denoise, program="sample",
                         in_shardings=(params_formats,) + (single,) * n_inputs)


def our_unet(config):
  return UNet3D.from_config(bench_unet_config(config), dtype=config.dtype,
                            param_dtype=config.param_dtype,
                            attention_impl=config.get("attention_impl"),
                            norm_impl=config.get("norm_impl"))


def unet_inputs(shapes: Shapes, batch: int, size: int, rng: jax.Array):
  """``(x [B, T, size, size, C], t [B], context [B, L, D])`` float32 / int32."""
  k1, k2, k3 = jax.random.split(rng, 3)
  x = jax.random.normal(k1, (batch, shapes.frames, size, size, shapes.channels))
  t = jax.random.randint(k2, (batch,), 0, 1000)
  context = jax.random.normal(k3, (batch, shapes.text_len, shapes.text_width))
  return x, t, context


def abstract_unet_params(unet, shapes: Shapes, boxed: bool = False):
  """The generator's params as ``ShapeDtypeStruct``s; ``boxed``: still in their
  ``nn.LogicallyPartitioned`` boxes (for ``sharding.param_shardings``)."""
  x, t, ctx = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in
               jax.eval_shape(lambda: unet_inputs(shapes, 1, shapes.size, jax.random.key(0))))
  variables = jax.eval_shape(unet.init, jax.random.key(0), x, t, ctx)
  return (variables if boxed else nn.meta.unbox(variables))["params"]


def denoise_program(config, shapes: Shapes, size: int, params=None, abstract: bool = False):
  """``(denoise, params, (x, t, ctx, kv_cache))``: one forward of the base generator
  at ``[2, T, size, size, C]`` as a sampler's step runs it: params cast as
  samplers use them (``stack.inference_params``), the text's keys and values
  computed once before the steps (``kv_cache``, ``video_transformer.KV_CACHE``;
  ``ctx`` is then unused). ``params`` is reused where given, else drawn. With
  ``abstract`` the params and inputs are ``jax.ShapeDtypeStruct`` trees (nothing
  allocated: for counting FLOPs of the lowered program, or compiling for an
  absent GPU)."""
  unet = our_unet(config)
  if params is None:
    params = abstract_unet_params(unet, shapes)
    if not abstract:
      params = params_lib.random_params(params, jax.random.key(1))
  params = inference_params(params, config.dtype)
  make_inputs = lambda: unet_inputs(shapes, CFG_BATCH, size, jax.random.key(2))

  fill = kv_cache_fn(unet)

  def denoise(p, x, t, ctx, kv_cache):
    return unet.apply({"params": p, KV_CACHE: kv_cache}, x, t, ctx)

  if abstract:
    x, t, ctx = jax.eval_shape(make_inputs)
    return denoise, params, (x, t, ctx, jax.eval_shape(fill, params, x, t, ctx))
  x, t, ctx = make_inputs()
  return denoise, params, (x, t, ctx, jax.jit(fill)(params, x, t, ctx))


def ours_denoise(config, shapes: Shapes, size: int, steps: int, params=None
                 ) -> tuple[Row, Any]:
  """One forward of the base generator at ``[2, T, size, size, C]``; returns the row
  and the params (reused by the next denoise row)."""
  denoise, params, inputs = denoise_program(config, shapes, size, params)

  compiled, compile_times = xla_options.compile_timed(
      jit_denoise(denoise, params, len(inputs), jax.local_devices()[0]), params, *inputs)
  # Once per generation in a sampler: the kernels in the layouts XLA chose.
  laid_out = jax.device_put(params, compiled.input_formats[0][0])
  times = time_calls(lambda: compiled(laid_out, *inputs), steps)
  row = Row(work="", shape="", ours_ms=median_ms(times),
            compile_s=compile_times.total_s, program_bytes=_program_bytes(compiled),
            peak_mem_bytes=device_peak_bytes(),
            extra=dict(params=int(sum(x.size for x in jax.tree.leaves(params))),
                       **compile_split(compile_times)))
  return row, params


def compile_split(times: xla_options.CompileTimes) -> dict:
  """A row's ``extra`` fields for where its ``compile_s`` went: ``trace_s``,
  ``lower_s``, ``xla_s`` and ``xla_from_cache`` (the persistent cache's load)."""
  return dict(trace_s=times.trace_s, lower_s=times.lower_s, xla_s=times.compile_s,
              xla_from_cache=times.cache_hit)


def train_program(config, shapes: Shapes, abstract: bool = False, *,
                  pack_matrices: bool = True):
  """``(train_step, state, batch, rng)`` of the base generator's train step;
  with ``abstract`` the state and batch are ``jax.ShapeDtypeStruct`` trees
  (nothing allocated: for counting FLOPs of the lowered program).
  ``pack_matrices``: the weights packed too (``train.packing``), as the trainer
  does where the parameters are not sharded; False for an FSDP-sharded step."""

  unet = our_unet(config)
  params = abstract_unet_params(unet, shapes)
  params = {"unet": params if abstract else params_lib.random_params(params, jax.random.key(1))}
  tc = ml_collections.ConfigDict(dict(
      trainable=("^unet/",), learning_rate=1e-4, warmup_steps=0, total_steps=1000,
      lr_min_ratio=1.0, weight_decay=0.0, adam_b1=0.9, adam_b2=0.99, grad_clip_norm=1.0))
  # As the trainer runs it: the trainable vectors (and, unsharded, the weights)
  # in flat buffers (train.packing).
  mask = state_lib.trainable_mask(params, tc.trainable)
  packing = packing_lib.Packing.plan(params, mask, matrices=pack_matrices)
  tx = state_lib.make_optimizer(tc, params, packing=packing)
  schedule = schedules.from_config(config.diffusion)

  def loss_fn(p, batch, rng):
    drop_rng, loss_rng = jax.random.split(rng)

    def denoise(q, x_t, t, context):
      return unet.apply({"params": q}, x_t, t, context, deterministic=False,
                        rngs={"dropout": drop_rng})

    out = losses.diffusion_loss(denoise, p["unet"], batch["x0"], loss_rng,
                                dict(context=batch["context"]), schedule=schedule,
                                prediction="eps")
    return out.loss, {"loss": out.loss}

  train_step = step_lib.make_train_step(loss_fn, tx, ema_decay=0.999,
                                        grad_clip_norm=tc.grad_clip_norm,
                                        trainable=packing.mask(mask), packing=packing)
  make_inputs = lambda: unet_inputs(shapes, shapes.batch, shapes.size, jax.random.key(3))
  create = lambda p: state_lib.create_state(packing.pack(p), tx)
  if abstract:
    state = jax.eval_shape(create, params)
    x0, _, ctx = jax.eval_shape(make_inputs)
    return train_step, state, dict(x0=x0, context=ctx), jax.eval_shape(lambda: jax.random.key(4))
  state = jax.jit(create)(params)
  x0, _, ctx = make_inputs()
  return train_step, state, dict(x0=x0, context=ctx), jax.random.key(4)


def ours_train(config, shapes: Shapes, steps: int) -> Row:
  """One train step (the project's ``make_train_step``: eps loss, AdamW with global-norm
  clipping, EMA) of the base generator on ``[B, T, S, S, C]`` latents + text states."""
  train_step, state, batch, rng = train_program(config, shapes)
  # As the trainer compiles it (one device here): the state in XLA's layouts.
  mesh = sh.make_mesh(1, 1)
  single = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  compiled, compile_times = step_lib.compile_train_step(
      train_step, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state),
      jax.tree.map(lambda _: single, state), batch, mesh)
  holder = [step_lib.place_state(compiled, state)]
  del state

  def call():
    holder[0], metrics = compiled(holder[0], batch, rng)
    return metrics["loss"]

  times = time_calls(call, steps)
  row = Row(work="", shape="", ours_ms=median_ms(times),
            compile_s=compile_times.total_s, program_bytes=_program_bytes(compiled),
            peak_mem_bytes=device_peak_bytes(),
            extra=dict(loss=float(jax.device_get(call())), **compile_split(compile_times)))
  return row


def _with_video_shape(config, shapes: Shapes):
  config = config.copy_and_resolve_references()
  config.video.frames, config.video.height, config.video.width = (
      shapes.frames, shapes.size, shapes.size)
  return config


def ours_cascade(config, shapes: Shapes, steps: int, sample_steps: int, sr_steps: int,
                 model=None) -> Row:
  """Latency of one video: ``sample_steps`` guided base steps + ``sr_steps`` SR steps."""
  config = _with_video_shape(config, shapes)
  model = model or model_lib.random_model(config, std=0.02)
  generator = gen.Generator(model, steps=sample_steps, sr_steps=sr_steps)
  bank = ConceptBank.from_config(config)
  image_slot = config.concepts.capacity - 1
  resolved = [gen.resolve(gen.Request("a red ball moving right on snow"), {}, image_slot,
                          config)]

  def call():
    return generator(bank, resolved, image_slot=image_slot, progress=False).video

  start = time.perf_counter()
  first = call()
  first_s = time.perf_counter() - start
  times = time_calls(call, max(1, min(steps, 3)))
  sr = config.video.sr_factor * shapes.size
  return Row(work="", shape="", ours_ms=median_ms(times),
             compile_s=max(first_s - min(times), 0.0), peak_mem_bytes=device_peak_bytes(),
             extra=dict(first_call_s=first_s, video=list(first.shape),
                        base=shape_str(1, shapes.frames, shapes.size, shapes.size),
                        sr=shape_str(1, shapes.frames, sr, sr)))


# What adding a concept runs (concepts.build.make_feature_fn).
CONCEPT_NETWORKS = ("image_encoder", "mapper", "extractor")


def sr_program(config, shapes: Shapes):
  """``(step, params, inputs)``: one step of the cascade's SR generator
  (``sr_denoise_fn``) on one video ``[1, T, 2S, 2S, C]`` (the SR scale of
  ``shapes.size``), its text keys and values read from the cache as
  ``Generator`` fills it, params cast as samplers hold them; abstract (for
  counting its FLOPs or compiling it for an absent GPU: the ``--aot`` work
  ``sr512``, the network the cascade runs after the base steps)."""
  side = config.video.sr_factor * shapes.size
  video = jax.ShapeDtypeStruct((1, shapes.frames, side, side, shapes.channels), jnp.float32)
  model = model_lib.abstract_model(config, networks=("sr_unet",))
  params = jax.eval_shape(lambda p: inference_params(p, config.dtype),
                          model.params["sr_unet"])
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  context = jax.ShapeDtypeStruct((1, shapes.text_len, shapes.text_width), jnp.float32)
  cond_video = jax.ShapeDtypeStruct(video.shape[:-1] + (config.sr_unet.cond_channels,),
                                    jnp.float32)
  kv_cache = jax.eval_shape(kv_cache_fn(model.stack.sr_unet), params, video, t, context,
                            cond_video=cond_video, noise_level=t)
  denoise = sr_denoise_fn(model.stack)

  def step(p, x, t, context, cond_video, noise_level, kv_cache):
    return denoise(p, x, t, context, cond_video, noise_level, kv_cache=kv_cache)

  return step, params, (video, t, context, cond_video, t, kv_cache)


def concept_program(config):
  """``(features, params, (crops, masks))``: the encoders' program of adding a
  concept from one photo (``build.make_feature_fn``, jitted) with abstract
  params and inputs (``crops [1, R, R, 3]``, ``masks [1, R, R, 1]``, R the
  reference size): for counting its FLOPs or compiling it for an absent GPU."""
  model = model_lib.abstract_model(config, networks=CONCEPT_NETWORKS)
  side = build.reference_size(config)
  crops = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  masks = jax.ShapeDtypeStruct((1, side, side, 1), jnp.float32)
  return build.make_feature_fn(model), model.params, (crops, masks)


def ours_concept(config, steps: int, photo: str | pathlib.Path | None = None,
                 model=None) -> Row:
  """Adding one concept from one photo: segmentation (host), encoders (device),
  database commit (host), each timed (``segment_ms``, ``features_ms``,
  ``commit_ms``; ``ours_ms`` their sum). A UI that previewed the mask skips the
  segmentation (``encode_concept(references=)``): its click costs the other two."""
  photo = pathlib.Path(photo or model_lib.DEMO_MODEL_DIR.parent / "demo_photos" / "sub1_a.png")
  model = model or model_lib.random_model(config, std=0.02, networks=CONCEPT_NETWORKS)
  feature_fn = build.make_feature_fn(model)
  parts: dict[str, list[float]] = {"segment": [], "features": [], "commit": []}

  with tempfile.TemporaryDirectory(prefix="bench_concepts.") as tmp:
    db = db_lib.ConceptDatabase.create(pathlib.Path(tmp) / "db", config, "bench",
                                       commit=False)

    def call():
      t0 = time.perf_counter()
      photos = build.load_photos([photo])
      refs = [build.subject_reference(image, config, mask) for image, mask in photos]
      t1 = time.perf_counter()
      feats = build.encode_concept(model, photos, [photo], feature_fn, references=refs)
      t2 = time.perf_counter()
      db.add("bench", feats.ref_tokens, feats.detail_tokens, list(feats.provenance))
      t3 = time.perf_counter()
      for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
        parts[key].append(seconds)
      db.remove("bench")   # not timed: the next call adds it again

    for _ in range(2 + max(1, min(steps, 5))):   # first call, warm-up, timed calls
      call()
  total = [sum(p) for p in zip(*parts.values())]
  timed = slice(2, None)
  return Row(work="", shape="", ours_ms=median_ms(total[timed]),
             compile_s=max(total[0] - min(total[timed]), 0.0),
             peak_mem_bytes=device_peak_bytes(),
             extra=dict(first_call_s=total[0], photo=photo.name,
                        segment_ms=median_ms(parts["segment"][timed]),
                        features_ms=median_ms(parts["features"][timed]),
                        commit_ms=median_ms(parts["commit"][timed])))
