"""``evaluate.suite``: the variants and the claims' verdicts."""

import pytest

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
