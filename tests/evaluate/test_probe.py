"""The denoising probe: every case and timestep measured; one clean error for bad input."""

import numpy as np
import pytest

from persvid_jax.evaluate import probe


def test_probe_measures_every_case(micro_model):
  r = probe.condition_probe(micro_model, examples=4, timesteps=(100, 900), draws=1)
  assert r["timesteps"] == [100, 900] and r["examples"] == 4 and r["space"] == "pixel"
  for part in ("subject", "background"):
    assert set(r[part]) == set(probe.CASES)
    for values in r[part].values():
      assert len(values) == 2 and all(np.isfinite(v) and v >= 0 for v in values)
  # Random weights still respond to their inputs: another reference, another
  # output (were these equal, the probe would not be reading the reference).
  assert r["subject"]["matched"] != r["subject"]["shuffled"]
  assert r["subject"]["none"] != r["subject"]["words"]
  assert r["reference_gain"] == pytest.approx(
      r["subject"]["shuffled"][1] - r["subject"]["matched"][1])
  # Deterministic: the same call, the same numbers.
  again = probe.condition_probe(micro_model, examples=4, timesteps=(100, 900), draws=1)
  assert again["subject"] == r["subject"]
  table = probe.markdown(r)
  assert "| matched |" in table and "| words |" in table and "reference gain" in table


@pytest.mark.parametrize("kw,match", [
    (dict(examples=1), "at least 2"),
    (dict(timesteps=(100, 5000)), "outside"),
])
def test_probe_bad_arguments(micro_model, kw, match):
  with pytest.raises(probe.ProbeError, match=match):
    probe.condition_probe(micro_model, **kw)
