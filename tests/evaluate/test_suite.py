"""``evaluate.suite``: the variants and the claims' verdicts."""

import numpy as np
import pytest
from PIL import Image

from persvid_jax.evaluate import suite


def _row(**means_stds):
  return dict(status="ok", metrics={m: dict(mean=v[0], std=v[1]) for m, v in means_stds.items()})


def test_sr_kernel_verdicts_compare_the_equal_budget_models():
  # The shipped SR ("method") trained longer: the kernel verdicts must not use it.
  results = dict(
      method=_row(single_instance=(0.9, 0.0)),
      sr_kernel5=_row(single_instance=(0.5, 0.03)),
      sr_kernel3=_row(single_instance=(0.3, 0.04)),
      sr_kernel3_dil2=_row(single_instance=(0.48, 0.04)))
  out = suite.compare(results)
  k3, dil = out["sr_kernel/sr_kernel3"], out["sr_kernel/sr_kernel3_dil2"]
  assert (k3["better"], k3["than"]) == ("sr_kernel5", "sr_kernel3")
  assert k3["margin"] == pytest.approx(0.2) and k3["spread"] == pytest.approx(0.05)
  assert k3["wins"] and not dil["wins"]
  # A missing side gives no verdict rather than a half one.
  del results["sr_kernel5"]
  assert not any(k.startswith("sr_kernel/") for k in suite.compare(results))


def test_swap_site_verdict_and_variant_training_commands():
  out = suite.compare(dict(swap_input=_row(colour_error=(0.30, 0.01), shape_iou=(0.6, 0.01)),
                           swap_output=_row(colour_error=(0.40, 0.01), shape_iou=(0.6, 0.01))))
  assert out["swap_site/colour_error"]["wins"] and not out["swap_site/shape_iou"]["wins"]
  # Every variant needing its own model says how to train it, with the shared budget.
  needs = {v.name: v.train for v in suite.variants() if v.model}
  assert set(needs) == {"sr_kernel5", "sr_kernel3", "sr_kernel3_dil2", "swap_input",
                        "swap_output"}
  for name, steps in (("sr_kernel5", suite.SR_STEPS), ("sr_kernel3", suite.SR_STEPS),
                      ("sr_kernel3_dil2", suite.SR_STEPS), ("swap_input", suite.SWAP_STEPS),
                      ("swap_output", suite.SWAP_STEPS)):
    # The variant's own workdir first: its config (kernel, swap site) is the model's.
    assert f"steps={steps} " in needs[name] and f"{name}=W/{name}," in needs[name]


def test_reference_scores_bracket_the_identity_metrics():
  # The renderer's own video of each prompt is the ceiling; scored against another
  # held-out subject it is chance. Both at the size the demo generates (8 x 32 x 32).
  cases = suite.make_cases(suite.SuiteConfig(subjects=3, photos=1, photo_size=32))
  ref = suite.reference_scores(cases, 8, 32, 32)
  truth, other = ref["truth"], ref["other_subject"]
  assert truth["motion_correct"] == 1.0 and truth["background_correct"] == 1.0
  assert truth["single_instance"] == 1.0 and other["instances"] < 0.5
  assert truth["colour_error"] < 0.1 < other["colour_error"]
  assert truth["shape_iou"] > 0.75 and truth["shape_iou"] > other["shape_iou"] + 0.1
  # The same prompt drawn again is the same video (the rows are reproducible).
  assert suite.reference_scores(cases[:1], 8, 32, 32)["truth"] == pytest.approx(
      suite.reference_scores(cases[:1], 8, 32, 32)["truth"])
  table = suite.markdown(dict(config=dict(subjects=3, prompts=1, seeds=[0]), variants={},
                              reference=ref))
  assert f"| *truth* | {truth['colour_error']:.3f} | {truth['shape_iou']:.3f} |" in table


def test_base_scale_scores_the_base_networks_videos(micro_model):
  v = micro_model.config.video
  cfg = suite.SuiteConfig(subjects=2, seeds=(0,), steps=2, sr_steps=1, scale="base")
  result = suite.run({None: micro_model}, cfg, ["method"])
  # The scale rows are drawn at the size of the videos scored: the base network's.
  assert result["reference"]["size"] == [v.frames, v.height, v.width]
  assert result["variants"]["method"]["status"] == "ok"
  assert "before the SR network" in suite.markdown(result)
  with pytest.raises(ValueError, match="use one of final, base"):
    suite.SuiteConfig(scale="sr")


@pytest.mark.slow   # two suite runs (~13 s)
def test_guidance_scales_reach_the_videos_and_the_table(micro_model, tmp_path):
  sheets = {}
  for scale in (0.0, 8.0):
    cfg = suite.SuiteConfig(subjects=1, seeds=(0,), steps=2, sr_steps=1, guidance_text=scale,
                            guidance_detail=scale)
    result = suite.run({None: micro_model}, cfg, ["method"], sheet_dir=tmp_path / str(scale))
    sheets[scale] = np.asarray(Image.open(tmp_path / str(scale) / "method.png"))
  # Same seed, same cases: only the CFG scales differ, and the videos with them.
  assert sheets[0.0].shape == sheets[8.0].shape and not np.array_equal(sheets[0.0], sheets[8.0])
  assert "guidance_text 8.0, guidance_detail 8.0" in suite.markdown(result)
  for bad in (-1.0, float("nan")):
    with pytest.raises(ValueError, match="use a finite scale >= 0"):
      suite.SuiteConfig(guidance_text=bad)
