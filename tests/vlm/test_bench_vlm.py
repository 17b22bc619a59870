"""`python -m benchmarks.bench_vlm --quick` measures a native VLM's step with and without the alignment head (the speed
itself is not asserted: only that the aligned step does the extra work and the table is written)."""

from __future__ import annotations


def test_quick_native_step_benchmark():
    from benchmarks import bench_vlm

    rows = bench_vlm.run(quick=True)
    assert [r["checkpointing"] for r in rows] == [False, True]
    for r in rows:
        assert r["image_tokens"] == 16 and r["batch"] == 4  # 112 px images: 4 x 4 merged tokens each
        assert r["extra_token_share"] > 0.3 and r["step_s_exgra_med"] > 0 and r["ratio"] > 1.0
    table = bench_vlm.to_markdown(rows)
    assert table.count("Qwen2.5-VL-shaped (quick") == 2 and "| on |" in table and "| off |" in table
