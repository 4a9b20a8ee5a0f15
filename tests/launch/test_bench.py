"""``python -m launch.bench`` on the CPU at the tiny config's shapes, with the peer.

One subprocess run times one denoise step of ours and of diffusers'
``UNet3DConditionModel`` on the same inputs; it must print the table, write
the JSON, import no TensorFlow (``-X importtime`` lists every import), and the
two sides' FLOPs -- XLA's cost analysis vs torch's flop counter, counted
independently -- must roughly agree, since both run the same network.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from persvid_jax import bench, config_lib
from persvid_jax import params as params_lib
from persvid_jax.pipeline import model as model_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _env():
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


@pytest.mark.slow
def test_cli_with_peer_on_cpu(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  out = tmp_path / "bench.json"
  run = subprocess.run(
      [sys.executable, "-X", "importtime", "-m", "launch.bench", "--config", "tiny", "--peer",
       "--which", "denoise256,attention", "--steps", "1", "--json", str(out)],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()
              if line.startswith("import time:")]
  assert "jax" in imported and "diffusers" in imported       # -X importtime did list them
  assert not [m for m in imported if m.split(".")[0] == "tensorflow"]

  assert "| work | shape | ours ms | peer eager ms | peer compile ms | ratio |" in run.stdout
  result = json.loads(out.read_text())
  assert result["platform"] == "cpu" and result["peak_tflops"] is None
  rows = {r["work"]: r for r in result["rows"]}
  assert sorted(rows) == ["denoise256"]
  for work, r in rows.items():
    assert f"| {work} | " in run.stdout
    assert r["ours_ms"] > 0 and r["peer_eager_ms"] > 0 and r["compile_s"] > 0
    assert r["ratio"] == pytest.approx(r["peer_eager_ms"] / r["ours_ms"])
    assert r["mfu"] is None                                    # no peak on a CPU
    # Same network, same shapes: XLA's count (it also counts elementwise ops)
    # and torch's (matmuls, convs, attention) within 25 %.
    assert 0.8 < r["flops"] / r["peer_flops"] < 1.25, (work, r["flops"], r["peer_flops"])
  assert rows["denoise256"]["shape"] == "2x4x16x16x3, text 16x32"
  assert rows["denoise256"]["peer_compile_ms"] is None
  assert "torch.compile skipped on CPU" in rows["denoise256"]["peer_note"]
  # Both sides built the same network.
  assert rows["denoise256"]["extra"]["params"] == result["peer"]["params"] > 0

  # Attention alone: XLA's kernel timed at the widest level's three calls; no
  # cuDNN on a CPU, so 'auto' (the config's) ran XLA and the cuDNN cells are empty.
  assert result["attention"] == {"implementation": "auto", "cudnn_available": False}
  assert result["group_norm"] == {"implementation": "auto", "runs": "xla"}
  ab = result["attention_ab"]
  assert [r["case"] for r in ab["rows"]] == ["spatial self", "cross (text)", "temporal"]
  spatial = ab["rows"][0]
  assert spatial["shape"] == "8x256x256, 2x16"                # 2 x 4 frames, 16x16 latents
  assert spatial["flops"] == 4 * 8 * 2 * 256 * 256 * 16
  assert all(r["xla_ms"] > 0 and r["xla_bwd_ms"] > 0 and "cudnn_ms" not in r
             for r in ab["rows"])
  assert "Attention alone (float32; cuDNN fused attention not available here)" in run.stdout


@pytest.mark.parametrize("args,message", [
    (["--which", "train,nope"], "unknown work ['nope']"),
    (["--size", "7"], "--size 7 must be a multiple of 2"),
    (["--json", "/nonexistent/dir/b.json"], "does not exist"),
])
def test_bad_input_exits_2(args, message):
  run = subprocess.run([sys.executable, "-m", "launch.bench", "--config", "tiny", *args],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert run.returncode == 2, run.stderr[-2000:]
  assert message in run.stderr and "Traceback" not in run.stderr
  assert len(run.stderr.strip().splitlines()) == 1


def test_default_shapes_are_the_issues_for_modelscope():
  config = config_lib.load_config("modelscope")
  shapes = bench.default_shapes(config)
  assert dataclasses.asdict(shapes) == bench.REFERENCE_SHAPES
  assert bench.row_shapes(shapes)["denoise512"] == "2x16x64x64x4, text 77x1024"
  assert bench.peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.0
  assert bench.peak_tflops_of("cpu") is None
  # The peer is built from the same generator config (the inverse of convert's mapping).
  from persvid_jax.convert.unet3d import unet_config
  kwargs = bench.peer_kwargs(bench.bench_unet_config(config))
  back = unet_config(dict(kwargs, _class_name="UNet3DConditionModel",
                          attention_head_dim=kwargs["attention_head_dim"]))
  u = bench.bench_unet_config(config)
  assert all(back[k] == (tuple(u[k]) if isinstance(back[k], tuple) else u[k]) for k in back)


def test_random_params_and_the_latent_models_vae():
  """N(0, std) leaves of the abstract shapes and dtypes, seeded, drawn in chunks;
  ``random_model(std=...)`` in latent space holds the VAE the cascade decodes with,
  and with ``networks`` only those (adding a concept builds the encoders only)."""
  import numpy as np
  abstract = {"a": jax.ShapeDtypeStruct((3, 5), np.float32),
              "b": {"c": jax.ShapeDtypeStruct((7,), jax.numpy.bfloat16)}}
  p = params_lib.random_params(abstract, jax.random.key(0), std=0.5, chunk=4)
  q = params_lib.random_params(abstract, jax.random.key(0), std=0.5, chunk=4)
  assert p["a"].shape == (3, 5) and p["b"]["c"].dtype == jax.numpy.bfloat16
  for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  big = params_lib.random_params({"w": jax.ShapeDtypeStruct((4000,), np.float32)},
                                 jax.random.key(1), std=0.5)["w"]
  assert 0.45 < float(np.std(big)) < 0.55 and abs(float(np.mean(big))) < 0.05

  model = model_lib.random_model(config_lib.load_config("tiny:latent"), std=0.02)
  assert set(model.params) == set(model.stack.network_names) and "vae" in model.params
  model = model_lib.random_model(config_lib.load_config("tiny"), std=0.02,
                                 networks=bench.CONCEPT_NETWORKS)
  assert set(model.params) == set(bench.CONCEPT_NETWORKS)


def test_aot_takes_the_concept_encoders_and_the_sr_step():
  """--aot compiles adding a concept's encoders and the cascade's SR step
  (abstract params: nothing drawn); --count compares with the peer, which has
  neither, and sr512 has no timed row."""
  assert bench.parse_works("train,concept,sr512", "aot") == ("train", "concept", "sr512")
  with pytest.raises(bench.BenchError, match="--count takes train, denoise256, denoise512 "
                                              "only, not concept"):
    bench.parse_works("concept", "count")
  with pytest.raises(bench.BenchError, match="sr512: compiled by --aot only"):
    bench.parse_works("train,sr512")
  from persvid_jax.bench import ours
  config = config_lib.load_config("tiny")
  features, params, (crops, masks) = ours.concept_program(config)
  assert set(params) == set(bench.CONCEPT_NETWORKS)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
  ref, detail = jax.eval_shape(features, params, crops, masks)
  assert crops.shape[0] == ref.shape[0] == detail.shape[0] == 1
  shapes = bench.default_shapes(config)
  step, params, inputs = ours.sr_program(config, shapes)
  side = config.video.sr_factor * shapes.size
  assert inputs[0].shape == (1, shapes.frames, side, side, shapes.channels)
  assert inputs[3].shape[-1] == config.sr_unet.cond_channels and "kv_cache" not in params
  assert jax.eval_shape(step, params, *inputs).shape == inputs[0].shape
  assert all(x.dtype == config.dtype for x in jax.tree.leaves(params) if x.ndim > 1)


def test_concept_row_times_its_three_parts(micro_model):
  """Segmentation (host), encoders (device), commit (host), each timed: the row's
  time is their sum per call."""
  from persvid_jax.bench import ours
  row = ours.ours_concept(micro_model.config, steps=1, model=micro_model)
  parts = [row.extra[k] for k in ("segment_ms", "features_ms", "commit_ms")]
  assert all(p > 0 for p in parts) and row.extra["photo"] == "sub1_a.png"
  assert row.ours_ms == pytest.approx(sum(parts))   # one timed call: medians of one


@pytest.mark.slow
def test_count_flops_cli_runs_nothing_and_matches_the_peer(tmp_path):
  """``--count``: both sides counted from shapes only (lowered program / meta device)."""
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  out = tmp_path / "count.json"
  run = subprocess.run(
      [sys.executable, "-m", "launch.bench", "--count", "--peer", "--config", "tiny",
       "--which", "denoise256", "--json", str(out)],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  row, = json.loads(out.read_text())["rows"]
  assert row["work"] == "denoise256" and "| denoise256 | 2x4x16x16x3, text 16x32 |" in run.stdout
  # The same network counted by XLA and by torch: within 10 % (XLA leaves out
  # the multiplies with a convolution's zero padding, torch counts them).
  assert 0.9 < row["flops"] / row["peer_flops"] < 1.1, row
  assert row["target"] is None          # targets exist at the reference shapes only


def test_count_flops_targets_at_the_issues_shapes(monkeypatch):
  """What each target asks (``assets/bench_reference.json``), from our FLOP count."""
  config = config_lib.load_config("modelscope")
  flops = {"denoise256": 9.4e12, "denoise512": 41e12, "train": 56e12}
  monkeypatch.setattr(bench.flops, "ours_flops", lambda c, s, w: flops[w])
  got = bench.count_flops(config, bench.default_shapes(config), bench.PEER_WORKS, log=lambda m: None)
  rows = {r["work"]: r for r in got["rows"]}
  assert rows["denoise256"]["target_ms"] == pytest.approx(28.0)
  assert rows["denoise512"]["target_ms"] == pytest.approx(100.0)
  # train: 38 % MFU (56e12 / (0.38 * 989e12) s = 149.0 ms) binds before 150 ms.
  assert rows["train"]["target_ms"] == pytest.approx(56e12 / (0.38 * 989e12) * 1e3)
  assert rows["train"]["need_mfu"] == pytest.approx(0.38)
  assert rows["denoise256"]["need_tflops"] == pytest.approx(9.4e12 / 28.0e-3 / 1e12)
  assert rows["train"]["issue_tflop"] == 58.7 and rows["train"]["peer_flops"] is None
  table = bench.flops_markdown(got)
  assert "| train | 4x16x32x32x4, text 77x1024 | 56 T | — |" in table and "| 38.0 % |" in table
