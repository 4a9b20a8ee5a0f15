"""Latent-space mode (``configs/tiny.py:micro,latent``): the stages train on the
frozen VAE's latents, the cascade samples latents and the Generator decodes
pixels, and a latent model's VAE travels with it (export, load, the seeded
random VAE of toy configs, a clear error otherwise).

Shapes: 2 frames of 8x8 (base) / 16x16 (SR) pixels = 4x4x4 / 8x8x4 latents
(``TINY_VAE``: factor 2, 4 latent channels).
"""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from persvid_jax import config_lib
from persvid_jax import sharding as sh
from persvid_jax.concepts.bank import ConceptBank
from persvid_jax.data import pipeline
from persvid_jax.diffusion import cascade
from persvid_jax.models import stack as stack_lib
from persvid_jax.pipeline import generate as gen
from persvid_jax.pipeline import model as model_lib
from persvid_jax.train import loop, stages

CONFIG = "tiny:micro,latent"


def _config(stage="base", **train):
  config = config_lib.load_config(f"{CONFIG},stage={stage}")
  config.train.update(train)
  return config


def _host_batch(s, config):
  batch = next(pipeline.make_dataset(config, "train", batch_size=config.train.batch_size,
                                     process_index=0, process_count=1,
                                     tokenize=s.tokenizer.encode))
  return {k: jnp.asarray(batch[k]) for k in s.batch_keys}


def test_latent_config_shapes():
  pixel, latent = config_lib.load_config("tiny:micro"), _config()
  assert not stack_lib.latent_enabled(pixel) and stack_lib.latent_enabled(latent)
  # config.video holds what the UNets see; data and pixel sizes are unchanged.
  assert (latent.video.height, latent.video.channels) == (pixel.video.height // 2, 4)
  assert stack_lib.pixel_size(latent) == stack_lib.pixel_size(pixel) == (8, 8)
  assert stack_lib.pixel_size(latent, sr=True) == (latent.data.height, latent.data.width)
  assert latent.unet.in_channels == latent.sr_unet.cond_channels == latent.vae.latent_channels
  assert not latent.diffusion.clip_x0
  assert stack_lib.network_names(latent) == stack_lib.NETWORKS + ("vae",)
  with pytest.raises(ValueError, match="latent channels"):
    bad = _config()
    bad.unet.in_channels = 3
    stack_lib.ModelStack.from_config(bad)


@pytest.fixture(scope="module")
def base_run():
  """Two base-stage steps (subject-weighted: the mask is resized to latents)."""
  config = _config("base", learning_rate=1e-3, warmup_steps=0, subject_loss_weight=5.0)
  s = loop.setup(config, mesh=sh.make_mesh(1, 1))
  state = s.create_state()
  before = jax.tree.map(np.array, state.params)
  batch = _host_batch(s, config)
  step = jax.jit(s.train_step, donate_argnums=0)
  metrics = []
  state = s.step_state(state)
  for _ in range(2):
    state, m = step(state, batch, s.train_rng)
    metrics.append({k: float(v) for k, v in m.items()})
  return s, before, s.saved_state(state), batch, metrics


@pytest.mark.slow
def test_base_stage_trains_on_latents_with_the_vae_frozen(base_run):
  s, before, state, batch, metrics = base_run
  assert set(state.params) == {"text_encoder", "unet", "vae"}
  for m in metrics:
    assert np.isfinite(m["loss"]) and 0.0 < m["loss"] < 10.0, m
  # The step runs on latents of the base-size pixel frames.
  pixels = stages.resize_video(batch["video"], *stack_lib.pixel_size(s.config))
  latents = stages.to_diffusion_space(s.ctx, state.params, pixels, None)
  assert latents.shape == (4, 2, 4, 4, 4)
  assert 0.3 < float(jnp.std(latents)) < 3.0      # scaling_factor ~ unit std
  # Frozen: bit for bit, also in the EMA's copy; the generator did move.
  after = jax.tree.map(np.asarray, state.params)
  ema = jax.tree.map(np.asarray, state.ema_params)
  for a, b, e in zip(*(jax.tree.leaves(t["vae"]) for t in (before, after, ema))):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, e)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["unet"]),
                                                       jax.tree.leaves(after["unet"])))


@pytest.mark.slow   # needs the trained latent base stage (base_run, ~35 s)
def test_sr_condition_is_the_base_target_upsampled(base_run):
  """The SR stage's low-res input is what the base stage trains the base network
  to produce (latents of the downsampled video), upsampled in latent space as
  the cascade upsamples the base network's samples."""
  s, _, state, batch, _ = base_run
  c, ctx = s.config, s.ctx

  @jax.jit
  def both(params, video, rng):
    base_target = stages.to_diffusion_space(
        ctx, params, stages.resize_video(video, *stack_lib.pixel_size(c)), rng)
    up = stages.low_res_condition(ctx, params, video, (8, 8), rng)
    sr_target = stages.to_diffusion_space(ctx, params, video, rng)
    return base_target, up, sr_target

  base_target, up, sr_target = both(state.params, batch["video"], jax.random.key(0))
  assert base_target.shape == (4, 2, 4, 4, 4) and up.shape == sr_target.shape == (4, 2, 8, 8, 4)
  np.testing.assert_allclose(up, cascade.upsample_video(base_target, (8, 8)), atol=1e-5)
  # Coarse but faithful: closer to the full-resolution latents than a shuffled batch is.
  err = float(jnp.mean((up - sr_target) ** 2))
  assert err < float(jnp.mean((up - jnp.roll(sr_target, 1, axis=0)) ** 2))


def test_training_refuses_a_trained_or_missing_vae():
  with pytest.raises(ValueError, match="frozen"):
    loop.setup(_config(trainable=("^unet/", "^vae/")), mesh=sh.make_mesh(1, 1))
  config = _config()
  config.latent.random_vae = False
  with pytest.raises(model_lib.ModelError, match="needs a VAE.*launch.convert --kind vae"):
    loop.setup(config, mesh=sh.make_mesh(1, 1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """An exported random-init latent model (its VAE included)."""
  return model_lib.export_model(model_lib.random_model(_config(), seed=1),
                                tmp_path_factory.mktemp("latent") / "model")


@pytest.mark.slow   # needs the trained latent base stage (base_run, ~35 s)
def test_generator_samples_latents_and_decodes_pixels(exported):
  model = model_lib.load_model(exported)
  assert set(model.params) == set(stack_lib.NETWORKS + ("vae",))
  generator = gen.Generator(model, steps=2, sr_steps=2)
  c = model.config
  image_slot = c.concepts.capacity - 1
  resolved = gen.resolve(gen.Request("a red star moving left"), {}, image_slot, c)
  out = generator(ConceptBank.from_config(c), [resolved], image_slot=image_slot, seed=0,
                  progress=False)
  # Pixels at both scales (the VAE decoded 4x4x4 and 8x8x4 latents).
  assert out.base.shape == (1, 2, 8, 8, 3) and out.video.shape == (1, 2, 16, 16, 3)
  for v in (out.base, out.video):
    assert np.all(np.isfinite(v)) and np.abs(v).max() <= 1.0 and v.std() > 0


@pytest.mark.slow   # needs the trained latent base stage (base_run, ~35 s)
def test_a_model_without_its_vae(base_run, exported, tmp_path):
  """Toy config: the seeded VAE training used; otherwise a ModelError naming the fix."""
  _, before, *_ = base_run
  exported = pathlib.Path(shutil.copytree(exported, tmp_path / "m"))
  weights = exported / model_lib.WEIGHTS_FILE
  flat = load_file(str(weights))
  save_file({k: v for k, v in flat.items() if not k.startswith("vae/")}, str(weights))
  model = model_lib.load_model(exported)
  for a, b in zip(jax.tree.leaves(model.params["vae"]), jax.tree.leaves(before["vae"])):
    np.testing.assert_array_equal(a, b)
  config_file = exported / model_lib.CONFIG_FILE
  config_file.write_text(config_file.read_text().replace('"random_vae": true',
                                                         '"random_vae": false'))
  with pytest.raises(model_lib.ModelError, match="holds no VAE.*--kind vae"):
    model_lib.load_model(exported)


@pytest.mark.slow   # needs the trained latent base stage (base_run, ~35 s)
def test_probe_measures_the_latent_base_network(exported):
  """The denoising probe in latent space: the ground truth goes through the
  VAE, the subject mask weighs latent cells by coverage."""
  from persvid_jax.evaluate import probe
  model = model_lib.load_model(exported)
  r = probe.condition_probe(model, examples=2, timesteps=(500,), draws=1)
  assert r["space"] == "latent"
  for part in ("subject", "background"):
    assert all(np.isfinite(v[0]) and v[0] > 0 for v in r[part].values()), r[part]
  assert r["subject"]["matched"] != r["subject"]["shuffled"]
  assert "latent cells" in probe.markdown(r)
