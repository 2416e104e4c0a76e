"""Smoke test of the Figure 1 benchmark script (benchmarks/figure1.py, smoke preset)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "figure1.py"
BUDGET_S = 60.0

# Enforced by pytest-timeout when it is installed; the test also checks its own time.
pytestmark = (
    [pytest.mark.timeout(BUDGET_S)] if importlib.util.find_spec("pytest_timeout") else []
)


def _load_script():
    spec = importlib.util.spec_from_file_location("figure1_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the script is executed.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def _finite(value):
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_figure1_smoke_preset_writes_all_panels(tmp_path):
    pytest.importorskip("matplotlib")
    figure1 = _load_script()
    start = time.perf_counter()
    figure1.main(["--preset", "smoke", "--out", str(tmp_path), "--n-jobs", "1"])
    assert time.perf_counter() - start < BUDGET_S

    for suffix in ("json", "png", "md"):
        assert (tmp_path / f"figure1_smoke.{suffix}").stat().st_size > 0
    results = json.loads((tmp_path / "figure1_smoke.json").read_text())
    assert results["metadata"]["status"] == "complete"
    assert results["metadata"]["data"]["source"] in ("pdb", "phantom")
    assert _finite(results["metadata"]["total_seconds"])
    assert set(results["panels"]) == set("ABCDEF")
    for name, panel in results["panels"].items():
        assert panel["methods"], name
        for method, stats in panel["methods"].items():
            assert len(stats["runs"]) == len(panel["snr"])
            for runs, mean in zip(stats["runs"], stats["mean_purity"], strict=True):
                assert runs, (name, method)
                assert _finite(mean) and 0.0 <= mean <= 1.0
                for run in runs:
                    assert _finite(run["purity"]) and 0.5 <= run["purity"] <= 1.0
                    assert _finite(run["seconds"]) and run["seconds"] > 0
                    assert _finite(run["median_orientation_error_deg"])
                    assert run["fsc"], (name, method)
                    for entry in run["fsc"]:
                        for key in ("fsc_0.5_A", "fsc_0.143_A"):
                            value = entry[key]
                            assert value is None or (_finite(value) and value > 0)
    assert {f["id"] for f in results["findings"]} == {1, 2, 3, 4}
    assert all(f["holds"] in (True, False, None) for f in results["findings"])
    assert set(results["timing"]) >= {"ML", "CC"}
