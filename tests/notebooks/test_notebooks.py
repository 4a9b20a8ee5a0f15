"""Both notebooks execute top to bottom (nbclient, the installed kernel), as in Colab.

Their install cell is a no-op here (the package is installed), so this runs the
same cells a Colab user runs after the install. A failing cell fails the test
with its traceback; the executed notebook is written next to the screenshots
(``$PERSVID_TEST_ARTIFACTS``) for a look at the outputs.
"""

import os
import pathlib
import tempfile
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart", "ablations"])
def test_notebook_runs(name, tmp_path):
  nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  # The kernel runs as a user's would: one CPU device, XLA's normal
  # optimisation (conftest's XLA_FLAGS -- 8 fake devices, -O0 for fast
  # compiles of tiny test programs -- would make sampling several times slower).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  t0 = time.perf_counter()
  client.execute(env=env)
  seconds = time.perf_counter() - t0
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  # Something was shown: the videos / images (HTML) or the plot (PNG).
  shown = [o for o in outputs if o.output_type in ("display_data", "execute_result")]
  kinds = {k for o in shown for k in o.get("data", {})}
  assert ("text/html" in kinds if name == "quickstart" else "image/png" in kinds), kinds
  out = pathlib.Path(os.environ.get("PERSVID_TEST_ARTIFACTS",
                                    pathlib.Path(tempfile.gettempdir()) / "persvid_test_artifacts"))
  out.mkdir(parents=True, exist_ok=True)
  nbformat.write(nb, out / f"{name}.executed.ipynb")
  print(f"{name}: {seconds:.0f} s")
