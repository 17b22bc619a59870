"""`python -m benchmarks --quick` runs every benchmark and writes a report (the speed itself is not asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmarks_write_a_report(tmp_path):
    out = tmp_path / "RESULTS.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # One thread: the suite may run beside other tests (pytest-xdist), and 2-thread torch on a shared core is slowed
    # many times over.
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("## Targets", "## Alignment loss and solver", "## Stage-2 training step", "## Answer generation",
                    "## Padding-free training batches"):
        assert heading in text
    verdicts = re.findall(r"\| (met|NOT met) \|", text)
    assert len(verdicts) == 6
    ms = float(re.search(r"B = 16 \(1 thread\) \| <= 50 ms \| ([0-9.]+) ms", text).group(1))
    assert ms > 0
    assert float(re.search(r"B = 64 \(1 thread\) \| <= 100 ms \| ([0-9.]+) ms", text).group(1)) > 0
    # both solver arrangements ran on the same nodes and gave the same loss at every step
    assert re.search(r"\| 64 \| sparse over dense: [0-9.]+x \([0-9.]+x\) \| True \|", text)
    assert "| True |" in text  # batched generation gave the batch-1 answers
    assert "## GPU: 7B-shaped model, bf16" in text  # the recorded GPU runs are carried into every report


@pytest.mark.slow
def test_gpu_benchmark_code_paths_run_on_cpu(tmp_path):
    """`bench_gpu --quick --device cpu` runs the GPU script's step, sweep, generation and solver code on a tiny model
    (no figures): a broken GPU benchmark is caught here, not on a lent GPU."""
    out = tmp_path / "gpu.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--quick", "--device", "cpu", "--only",
                           "align,sweep", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    kinds = [r["benchmark"] for r in rows]
    assert kinds.count("gpu_align") == 2 and kinds.count("gpu_sweep") == 2
    for r in rows:
        if r["benchmark"] == "gpu_sweep":
            # extra LLM tokens make the aligned step cost more model FLOPs, growing with the text length
            assert r["flops_ratio"] > 1 and r["exgra_med_s"] > 0
    sweep = [r["flops_ratio"] for r in rows if r["benchmark"] == "gpu_sweep"]
    assert sweep[1] > sweep[0]
    assert "| 16 | 4096 | cpu |" in proc.stdout


def test_align_benchmark_times_both_solver_arrangements():
    from benchmarks import bench_align

    rows = bench_align.time_steps(12, repeats=2, dim=16)
    speed = [r for r in rows if r["kind"] == "speed"]
    assert [r["pairs"] for r in speed] == ["dense", "sparse"]
    assert all(r["ms_median"] > 0 and r["cpu_ms_median"] >= 0 and 0 <= r["hamming"] <= 2 for r in speed)
    assert speed[0]["hamming"] == speed[1]["hamming"]
    (ratio,) = [r for r in rows if r["kind"] == "speedup"]
    assert ratio["same_losses"] is True and ratio["wall_ratio"] > 0
    assert bench_align.step_ms(rows, 12) == speed[1]["ms_median"]
    table = bench_align._table([r | {"threads": 1} for r in rows])
    assert "| 12 | 16 | 1 | sparse |" in table and "| 12 | sparse over dense:" in table


def test_recorded_gpu_runs_render():
    from benchmarks.__main__ import gpu_section

    text = gpu_section()
    assert "MFU" in text and "| lm_only | sdpa | 16 x 514 |" in text
    assert "| 514 | 32 + 64 |" in text  # the sweep over alignment text lengths
