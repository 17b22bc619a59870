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
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("## Targets", "## Alignment loss and solver", "## Stage-2 training step", "## Answer generation"):
        assert heading in text
    verdicts = re.findall(r"\| (met|NOT met) \|", text)
    assert len(verdicts) == 3
    ms = float(re.search(r"B = 16 \(1 thread\) \| <= 50 ms \| ([0-9.]+) ms", text).group(1))
    assert ms > 0
    assert "| True |" in text  # batched generation gave the batch-1 answers
