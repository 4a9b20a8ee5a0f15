"""Benchmarks: our train and denoise steps, the cascade, adding a concept; the peer.

Modules: ``core`` (works, shapes, a row, timing), ``ours`` (our programs, timed or
abstract), ``peer`` (diffusers in torch: the only module that imports it), ``flops``
(counting without a device), ``aot`` (compiling for an absent GPU), ``attention`` (XLA
against cuDNN), ``runner`` (a run and its table). This module re-exports what
``launch.bench`` and users call.

Works (``WORKS``), each one row of the table:

============  ==========================================================================
``train``     one train step of the base generator: ``[B, T, S, S, C]`` latents,
              ``[B, L, D]`` text states, eps loss, AdamW + clipping + EMA (the project's
              ``train.step.make_train_step``)
``denoise256`` one forward of the base generator at batch 2 (CFG: unconditional +
              conditional rows), ``[2, T, S, S, C]``
``denoise512`` the same at twice the side, ``[2, T, 2S, 2S, C]``
``cascade``   end-to-end generation of one video with ``pipeline.generate.Generator``:
              DDIM base steps (3-branch CFG: text and detail scales) + SR steps
``concept``   adding a concept from one photo: subject recognition, encoders, Orbax commit
``attention`` attention alone at the generator's widest level, XLA's kernel against
              cuDNN's fused one (``attention_ab``; its own table, not a row)
============  ==========================================================================

Default shapes come from the config: ``S = config.video.height``, ``T =
config.video.frames``, ``L = config.text.max_length``, ``C`` and ``D`` of
``config.unet``; the train batch is 4. For ``configs/modelscope.py`` these are
the reference shapes (4 x 16 x 32x32x4 latents, 77 x 1024 text; 256 / 512 px after
the VAE's 8x); ``configs/tiny.py`` shrinks them to 4 x 4 x 16x16x3, 16 x 32.

The peer (``--peer``) is diffusers' ``UNet3DConditionModel`` built from the same
generator config (``peer_kwargs``), on the same inputs, in torch: eager and
``torch.compile``, bf16 autocast when our compute dtype is bf16 on a GPU. For the
comparison both sides run the plain ModelScope layout: detail attention off and
diffusers' 8 heads in ``transformer_in`` (our method's extra detail branch is
timed in the ``cascade`` row).

Measured per row: median wall time of ``steps`` calls (each waited for with
``block_until_ready`` / ``cuda.synchronize``) after one warm-up; FLOPs counted
from the lowered program with attention traced as XLA's matmuls (``ours_flops``,
what ``--count`` prints: a compiled GPU program hides its cuDNN convolutions and
attention from XLA's cost analysis), the peer's from torch's ``FlopCounterMode``
(matmuls, convs, attention); TFLOP/s = FLOPs / time; MFU against
``peak_tflops``; the device's peak memory (``memory_stats``, a high-water mark
of the process, so rows run smallest first); compile seconds of
``jit(...).lower(...).compile()``.

The denoise rows time the step as the samplers run it: the generator's params
cast once to the compute dtype (``stack.inference_params``: the same outputs bit
for bit) and laid out as XLA asks (``Layout.AUTO``: convolution kernels in
cuDNN's order, so no per-step transposes). Every program is compiled with the
options of ``persvid_jax.xla_options``, which the JSON records. The peer's
denoise rows run its weights in bf16 (``model.to(torch.bfloat16)``, as diffusers
pipelines run with ``torch_dtype``); its train row keeps float32 weights under
bf16 autocast (mixed precision, as ours).
"""

from persvid_jax.bench.core import (CFG_BATCH, DEFAULT_WORKS, PEAK_TFLOPS, PEER_WORKS, REFERENCE,
                                    REFERENCE_SHAPES, TRAIN_BATCH, WORKS, BenchError, Row, Shapes,
                                    bench_unet_config, default_shapes, latent_side, parse_works,
                                    peak_tflops_of, row_shapes)
from persvid_jax.bench.ours import (CONCEPT_NETWORKS, jit_denoise, ours_cascade,
                                    ours_concept, ours_denoise, ours_train)
from persvid_jax.bench.peer import peer_kwargs
from persvid_jax.bench.flops import count_flops, flops_markdown, ours_flops, peer_flops
from persvid_jax.bench.aot import aot_markdown, aot_report
from persvid_jax.bench.attention import attention_ab, attention_cases, attention_markdown
from persvid_jax.bench.runner import markdown, run

__all__ = ["CFG_BATCH", "DEFAULT_WORKS", "REFERENCE_SHAPES", "PEAK_TFLOPS", "PEER_WORKS",
           "REFERENCE", "TRAIN_BATCH", "WORKS", "BenchError", "Row", "Shapes",
           "bench_unet_config", "default_shapes", "latent_side", "parse_works", "peak_tflops_of",
           "row_shapes", "CONCEPT_NETWORKS", "jit_denoise", "ours_cascade",
           "ours_concept", "ours_denoise", "ours_train", "peer_kwargs", "count_flops",
           "flops_markdown", "ours_flops", "peer_flops", "aot_markdown", "aot_report",
           "attention_ab", "attention_cases", "attention_markdown", "markdown", "run"]
