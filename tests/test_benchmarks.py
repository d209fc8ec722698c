"""The benchmark scripts run end to end (tiny settings) and print what they promise."""

import json
import subprocess
import sys

from .conftest import ROOT


def run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_quality_smoke_budget(tmp_path):
    r = run(
        "benchmarks/quality.py",
        "--budget",
        "smoke",
        "--seeds",
        "2",
        "--variants",
        "mae,apl_drop",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(row["variant"], row["seed"]) for row in res["rows"]] == [
        ("mae", 0),
        ("mae", 1),
        ("apl_drop", 0),
        ("apl_drop", 1),
    ]
    for row in res["rows"]:
        assert 0 <= row["probe_cls"] <= 100 and 0 <= row["knn_avg"] <= 100
    table = (tmp_path / "results.md").read_text()
    assert "| apl_drop |" in table and "±" in table


def test_throughput_prints_its_ratio_last():
    r = run("benchmarks/throughput.py", "--only", "plain,apl", "--steps", "2", "--warmup", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "ratio_vs_hf=nan"  # hf not run
    assert any(line.strip().startswith("apl") and "img/s" in line for line in lines)
