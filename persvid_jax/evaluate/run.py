"""One evaluation, end to end: the suite, the ablations, DreamBench or the probe -> files.

``evaluate`` is what ``python -m launch.evaluate`` runs (its docstring has
the command lines): it checks everything it can before the model loads (the
variant models named, the suite / DreamBench / probe settings of the
config), runs one of the three evaluations, and writes ``OUT`` (JSON), the
table as ``OUT`` with ``.md`` and the run record beside them, all only when
the run is complete.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

from persvid_jax import atomic
from persvid_jax import config_lib
from persvid_jax import records
from persvid_jax.evaluate import dreambench, probe, protocol, suite
from persvid_jax.pipeline import model as model_lib


@dataclasses.dataclass(frozen=True)
class Evaluated:
  """What ``evaluate`` wrote: the result (``OUT``) and its table (``OUT`` with .md)."""
  result: dict[str, Any]
  table: str
  paths: tuple[pathlib.Path, pathlib.Path]      # (json, md)

def check_config(config, *, run_probe: bool = False, run_dreambench: bool = False) -> None:
  """Raises ``ConfigError`` (field, value, what it must be) for a bad suite setting, or an
  out-of-range setting of the probe / DreamBench when ``run_probe`` / ``run_dreambench``.

  Cheap (no model): called before anything loads, so that e.g.
  ``--config.probe.draws=0`` is one line at once, not an error after minutes.
  """
  def integer(key, value, lo, hi=None):
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (
        hi is None or value <= hi)
    if not ok:
      want = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
      raise config_lib.ConfigError(f"config.{key}={value!r} must be {want}")

  try:     # every mode: as before the probe and DreamBench modes existed
    suite.SuiteConfig.from_config(config.suite)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.suite: {e}") from None
  if run_probe:
    integer("probe.examples", config.probe.examples, 2)    # shuffling needs a partner
    integer("probe.draws", config.probe.draws, 1)
    for t in config.probe.timesteps:
      integer("probe.timesteps[i]", t, 0)
  elif run_dreambench:
    integer("dreambench.prompts", config.dreambench.prompts, 0)     # 0: all 25
    integer("dreambench.photos", config.dreambench.photos, 1)
    for s in config.dreambench.seeds:
      integer("dreambench.seeds[i]", s, 0, config_lib.SEED_MAX)


def evaluate(config, out: str | pathlib.Path, *, model: Sequence[str] | None = None,
             variant_models: Mapping[str, Sequence[str]] | None = None,
             ablations: bool = False, run_dreambench: bool = False, run_probe: bool = False,
             sheets: str | pathlib.Path | None = None, progress: bool = False,
             command: str = "", log: Callable[[str], None] = print) -> Evaluated:
  """Runs one evaluation of ``model`` and writes its results.

  Args:
    config: an eval config (``configs/eval.py``), overrides applied.
    out: the results JSON (``.json``); the table goes beside it as ``.md``,
      the run record as ``OUT.run_record.json``.
    model: exported model or training workdir(s) (default the shipped demo model).
    variant_models: ``{variant model name: paths}`` for the ablations that need
      a model trained for them (``suite.VARIANTS``' ``model``).
    ablations: every variant of the suite, not ``config.variants``.
    run_dreambench, run_probe: the DreamBench protocol or the denoising probe
      instead of the synthetic suite (at most one).
    sheets: also write a contact sheet per suite variant into this directory.
    progress: sampler progress bars.
    command: the command line, recorded in the results and the table.
    log: where progress lines go.

  Raises:
    config_lib.ConfigError: a bad setting or combination (before the model loads).
    And the library's user errors (``ModelError``, ``DreamBenchError``,
    ``ProbeError``, ...).
  """
  out = pathlib.Path(out)
  variant_models = dict(variant_models or {})
  if run_dreambench and run_probe:
    raise config_lib.ConfigError("--dreambench and --probe: choose one")
  known = {v.model for v in suite.VARIANTS if v.model}
  for name in variant_models:
    if name not in known:
      raise config_lib.ConfigError(f"--variant-model {name}: no variant needs it; known: "
                                   f"{', '.join(sorted(known))}")
  check_config(config, run_probe=run_probe, run_dreambench=run_dreambench)
  t0 = time.perf_counter()
  loaded = model_lib.load_model(list(model) if model else None)
  log(f"model: {loaded.source} ({loaded.config.name})")
  if run_probe:
    result = probe.condition_probe(loaded, examples=int(config.probe.examples),
                                   timesteps=tuple(config.probe.timesteps),
                                   draws=int(config.probe.draws))
    table = probe.markdown(result)
  elif run_dreambench:
    result = _dreambench(loaded, config.dreambench, progress, log)
    table = dreambench.markdown(result)
  else:
    names = None if ablations else list(config.variants)
    try:
      suite.variants(names)
    except ValueError as e:
      raise config_lib.ConfigError(f"config.variants: {e}") from None
    models = {None: loaded}
    for name, paths in variant_models.items():
      models[name] = model_lib.load_model(list(paths))
    if sheets:
      pathlib.Path(sheets).mkdir(parents=True, exist_ok=True)
    result = suite.run(models, suite.SuiteConfig.from_config(config.suite), names,
                       progress=progress, log=log, sheet_dir=sheets)
    table = suite.markdown(result)
  result["model"] = loaded.source
  result["command"] = command
  result["wall_seconds"] = round(time.perf_counter() - t0, 1)
  table += f"\n{result['wall_seconds']:.0f} s wall; command: `{command}`\n"
  # OUT.run_record.json beside the results (and OUT.run_records/NNN.json):
  # what produced them; a rerun into the same name warns about differences.
  # Written with the results, so a run stopped by bad input leaves nothing.
  records.record_run(out.parent, config, name=f"{out.stem}.run_record",
                     extra={"kind": "evaluate",
                            "model": ",".join(model) if model else "shipped demo",
                            "variant_models": {k: list(v) for k, v in variant_models.items()},
                            "ablations": ablations, "dreambench": run_dreambench,
                            "probe": run_probe})
  atomic.write_text(out.with_suffix(".md"), table)
  atomic.write_text(out, json.dumps(result, indent=2))
  return Evaluated(result=result, table=table, paths=(out, out.with_suffix(".md")))


def _dreambench(model, d, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
  """The DreamBench protocol over ``d.root`` with random-weight encoders."""
  bench = dreambench.load(d.root)
  tok = model.tokenizer
  scorer = protocol.random_scorer(tok.encode, len(tok), tok.max_length, eos_token_id=tok.eos_id)
  log("note: random-weight CLIP/DINO encoders (no weights imported): the protocol runs end "
      "to end, its numbers are not comparable to papers'")
  return dreambench.run(model, scorer, bench, subjects=list(d.subjects) or None,
                        num_prompts=int(d.prompts) or None, seeds=tuple(d.seeds),
                        max_photos=int(d.photos), progress=progress)
