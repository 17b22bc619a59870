"""Serving under concurrency: 8 simultaneous requests against one request, through the batching engine.

A tiny random model is built offline. One request, then 8 requests sent at once from 8 threads (the way the API and
web servers call the engine), each with the same fixed answer length; the median wall time of each is reported and
their ratio (8 requests decoded one after the other would cost about 8x).

    python -m benchmarks.bench_serve [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

CONCURRENT = 8


def run(quick: bool = False, threads: int = 1) -> list[dict]:
    """Rows for 1 and CONCURRENT requests: median seconds, and the ratio to one request."""
    from exgra_med.model.auto import LoadOptions
    from exgra_med.model.tiny import make_tiny_model
    from exgra_med.serve.engine import GenerationSettings, InferenceEngine

    torch.set_num_threads(threads)
    repeats, max_new_tokens = (2, 16) if quick else (7, 64)
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model(Path(tmp) / "model", seed=0)
        engine = InferenceEngine.from_path(str(Path(tmp) / "model"), LoadOptions(device="cpu"),
                                           max_batch_size=CONCURRENT)
        # A template without a stop string and an EOS the model never reaches: every answer has the full length.
        engine.backend.template = dataclasses.replace(engine.backend.template, stop_str="")
        engine.tokenizer.eos_token_id = None
        settings = GenerationSettings(max_new_tokens=max_new_tokens)
        image = Image.new("RGB", (64, 48), (200, 30, 30))
        questions = [f"Question {i}: what colour is the shape?" for i in range(CONCURRENT)]

        def ask(question: str) -> str:
            return engine.answer([("human", question)], image, settings)

        ask(questions[0])  # warm-up
        rows = []
        for n in (1, CONCURRENT):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                with ThreadPoolExecutor(max_workers=n) as pool:
                    list(pool.map(ask, questions[:n]))
                times.append(time.perf_counter() - start)
            rows.append({"benchmark": "serve", "requests": n, "max_new_tokens": max_new_tokens, "threads": threads,
                         "repeats": repeats, "seconds": round(statistics.median(times), 3)})
        batches = list(engine.scheduler.batch_sizes)
        engine.close()
    for row in rows:
        row["ratio_to_one"] = round(row["seconds"] / rows[0]["seconds"], 2)
    rows[-1]["largest_batch"] = max(batches)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| concurrent requests | new tokens each | threads | median s | time / one request |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['requests']} | {r['max_new_tokens']} | {r['threads']} | {r['seconds']:.2f} | "
                     f"{r['ratio_to_one']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    result = run(quick=args.quick, threads=args.threads)
    print(markdown(result))
    print(f"\nlargest batch: {result[-1]['largest_batch']}; one after the other would be about {CONCURRENT}x")
