"""The suite's verdicts and tables: does a variant beat another beyond the spread?

``compare`` tests the claims the suite is built for (personalization, detail,
cascade, SR kernel, swap site); ``verdict`` any pair on any metric with the
same rule; ``markdown`` renders a suite result (``suite.run``) as its table.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

from persvid_jax.evaluate import groundtruth as gt


def _verdict(results: Mapping[str, Any], a: str, b: str, metric: str,
             higher_better: bool) -> dict[str, Any] | None:
  """``verdict`` with the direction given; None unless both variants ran."""
  ra, rb = results.get(a, {}), results.get(b, {})
  if ra.get("status") != "ok" or rb.get("status") != "ok":
    return None
  ma, mb = ra["metrics"][metric], rb["metrics"][metric]
  diff = (ma["mean"] - mb["mean"]) * (1 if higher_better else -1)
  spread = math.sqrt(ma["std"] ** 2 + mb["std"] ** 2)
  return dict(metric=metric, better=a, than=b, **{a: ma, b: mb}, margin=diff,
              spread=spread, wins=bool(diff > spread))


def verdict(results: Mapping[str, Any], a: str, b: str, metric: str) -> dict[str, Any] | None:
  """Does variant ``a`` beat ``b`` on ``metric`` beyond the spread? (the suite's rule)

  ``results``: the ``variants`` of a suite result. The margin is the mean
  difference in the metric's better direction (``groundtruth.HIGHER_IS_BETTER``;
  ``instances`` has none and is refused: use ``single_instance``); the spread
  is ``sqrt(std_a² + std_b²)`` over seeds; ``wins`` when margin > spread.
  None unless both ran.
  """
  higher = gt.HIGHER_IS_BETTER.get(metric)
  if higher is None:
    raise ValueError(f"metric {metric!r} has no better direction; use one of "
                     f"{sorted(k for k, v in gt.HIGHER_IS_BETTER.items() if v is not None)}")
  return _verdict(results, a, b, metric, higher)


def compare(results: Mapping[str, Any]) -> dict[str, Any]:
  """The claims the suite tests, as verdicts with their numbers.

  * personalization: method vs removed on colour error and shape IoU — the
    method wins a metric when the mean difference exceeds the two spreads
    combined (sqrt of the summed variances over seeds);
  * detail: method vs detail_off, and the fused target vs the stored-only
    one, on pattern error;
  * cascade: method vs no_cascade on single-instance frames and colour error;
  * SR kernel: the equal-budget 5x5 vs 3x3 and 3x3 dilated, single-instance;
  * swap site: input vs output on colour error and shape IoU.
  """
  out = {}
  verdict = functools.partial(_verdict, results)

  for metric, hb in (("colour_error", False), ("shape_iou", True)):
    v = verdict("method", "removed", metric, hb)
    if v:
      out[f"personalization/{metric}"] = v
  # Detail: the detail tokens carry what mean colour and silhouette cannot see.
  for a, b in (("method", "detail_off"), ("target_fused", "target_stored")):
    v = verdict(a, b, "pattern_error", False)
    if v:
      out[f"detail/{b}"] = v
  for metric in ("single_instance", "colour_error"):
    v = verdict("method", "no_cascade", metric, gt.HIGHER_IS_BETTER[metric])
    if v:
      out[f"cascade/{metric}"] = v
  # The SR kernels against the equal-budget 5x5 (the shipped SR network trained
  # longer, so "method" would confound kernel with budget).
  for name in ("sr_kernel3", "sr_kernel3_dil2"):
    v = verdict("sr_kernel5", name, "single_instance", True)
    if v:
      out[f"sr_kernel/{name}"] = v
  for metric, hb in (("colour_error", False), ("shape_iou", True)):
    v = verdict("swap_input", "swap_output", metric, hb)
    if v:
      out[f"swap_site/{metric}"] = v
  return out


_COLUMNS = (("colour_error", "colour err ↓"), ("shape_iou", "shape IoU ↑"),
            ("pattern_error", "pattern err ↓"),
            ("background_correct", "background ↑"), ("motion_correct", "motion ↑"),
            ("temporal_consistency", "temporal ↑"), ("instances", "instances (1)"),
            ("single_instance", "1 instance ↑"))


# The scale rows (``reference_scores``), below the variants.
_REFERENCE_ROWS = (
    ("truth", "the renderer's own video of each prompt: the best score at this size"),
    ("other_subject", "that video scored against another held-out subject: chance on identity"))


def verdict_table(verdicts: Mapping[str, Mapping[str, Any]]) -> str:
  """``{'claim/...': verdict}`` (``compare``, ``verdict``) as a markdown table."""
  lines = ["| claim | metric | method | other | margin | spread | holds |",
           "|---|---|---|---|---|---|---|"]
  for key, v in verdicts.items():
    a, b = v["better"], v["than"]
    lines.append(f"| {key.split('/')[0]}: {a} vs {b} | {v['metric']} | {v[a]['mean']:.3f} | "
                 f"{v[b]['mean']:.3f} | {v['margin']:+.3f} | {v['spread']:.3f} | "
                 f"{'yes' if v['wins'] else 'no'} |")
  return "\n".join(lines) + "\n"


def markdown(result: Mapping[str, Any]) -> str:
  """The suite's result as a markdown table (mean ± std over seeds) + verdicts."""
  cfg = result["config"]
  scored = (" Scored: the base network's videos (`scale=base`), before the SR network."
            if cfg.get("scale") == "base" else "")
  sampler = {k: cfg.get(k) for k in ("steps", "sr_steps", "guidance_text", "guidance_detail")
             if cfg.get(k) is not None}
  if sampler:   # what differs from the model config's sampler
    scored += " Sampler: " + ", ".join(f"{k} {v}" for k, v in sampler.items()) + "."
  lines = [f"{cfg['subjects']} held-out subjects x {cfg['prompts']} prompts x "
           f"{len(cfg['seeds'])} seeds per row; mean ± std over seeds.{scored}", "",
           "| variant | " + " | ".join(h for _, h in _COLUMNS) + " | what |",
           "|---|" + "---|" * (len(_COLUMNS) + 1)]
  for name, r in result["variants"].items():
    if r["status"] != "ok":
      lines.append(f"| {name} | " + " | ".join("—" for _ in _COLUMNS)
                   + f" | not run: {r['description']} |")
      continue
    cells = [f"{r['metrics'][k]['mean']:.3f} ± {r['metrics'][k]['std']:.3f}" for k, _ in _COLUMNS]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['description']} |")
  for key, what in _REFERENCE_ROWS:
    ref = (result.get("reference") or {}).get(key)
    if ref:
      lines.append(f"| *{key.replace('_', ' ')}* | "
                   + " | ".join(f"{ref[k]:.3f}" for k, _ in _COLUMNS) + f" | {what} |")
  if result.get("comparison"):
    lines += [""] + verdict_table(result["comparison"]).splitlines()
  missing = [(n, r["needs"]) for n, r in result["variants"].items() if r["status"] != "ok"]
  if missing:
    lines += [""] + [f"- `{n}` needs: `{cmd}`" for n, cmd in missing]
  return "\n".join(lines) + "\n"
