"""examples/ablation.py end to end, shortened: every loss with and without hard negatives, one seed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "ablation.py"


def test_ablation_writes_its_table_results_and_plot(tmp_path):
    out = tmp_path / "ablation"
    argv = [sys.executable, str(SCRIPT), "--steps", "2", "--seeds", "0", "--eval_images", "8", "--output", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 6 and len(results["summary"]) == 6
    assert {(r["loss"], r["hard_negatives"]) for r in results["runs"]} == {
        (loss, hard) for loss in ("InfoNCE", "LLaVE hardness α=9", "UniME margin 0.1 + top-8") for hard in (False, True)
    }
    for run in results["runs"]:
        assert run["num_images"] == 8 and 0 <= run["t2i_R@1"] <= 100 and 0 <= run["i2t_R@1"] <= 100
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 2 + 6 and "UniME margin 0.1 + top-8 | yes" in table
    assert (out / "ablation.png").stat().st_size > 1000
