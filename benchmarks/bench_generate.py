"""Answer-generation throughput: batch 16 (left padding + KV cache) against batch 1, same questions, same run.

A tiny random model and a small easy-VQA set are built offline in a temporary folder. Each batch size
answers the same questions `repeats` times (greedy, fixed `max_new_tokens`; the random model never
stops early, so both do the same decoding work); the median wall time is reported. Target: >= 5x.

    python -m benchmarks.bench_generate [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

TARGET_SPEEDUP = 5.0


def _setup(root: Path, n_questions: int):
    from exgra_med.data.prepare.easy_vqa import prepare
    from exgra_med.model.loading import load_pretrained
    from exgra_med.model.tiny import make_tiny_model

    make_tiny_model(root / "model", seed=0)
    prepare(root / "data", max_images=max(8, n_questions // 4), seed=0)
    questions = json.loads((root / "data" / "test.json").read_text())[:n_questions]
    model, tokenizer, processor = load_pretrained(str(root / "model"), dtype=torch.float32)
    return model, tokenizer, processor, questions, root / "data" / "images"


def run(quick: bool = False, threads: int = 2, batch_size: int = 16) -> list[dict]:
    """One row per batch size (1 and `batch_size`): median seconds, questions/s, speedup over batch 1."""
    from exgra_med.eval.generate import generate_answers

    torch.set_num_threads(threads)
    n_questions, repeats, max_new_tokens = (32, 2, 8) if quick else (64, 3, 16)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, processor, questions, images = _setup(Path(tmp), n_questions)
        # Warm-up: first calls pay for lazy initialisation.
        generate_answers(model, tokenizer, processor, questions[:4], 4, max_new_tokens=2, image_folder=images)
        rows, answers = [], {}
        for bs in (1, batch_size):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                answers[bs] = generate_answers(
                    model, tokenizer, processor, questions, bs, max_new_tokens=max_new_tokens, image_folder=images
                )
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            rows.append({"benchmark": "generate", "batch_size": bs, "questions": len(questions),
                         "max_new_tokens": max_new_tokens, "threads": threads, "repeats": repeats,
                         "seconds": round(seconds, 3), "questions_per_s": round(len(questions) / seconds, 2)})
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = round(base / row["seconds"], 2)
        row["same_answers_as_batch_1"] = answers[row["batch_size"]] == answers[1]
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| batch | questions | new tokens | threads | median s | questions/s | speedup | same answers |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['questions']} | {r['max_new_tokens']} | {r['threads']} | "
            f"{r['seconds']:.2f} | {r['questions_per_s']:.1f} | {r['speedup']:.1f}x | {r['same_answers_as_batch_1']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = run(quick=args.quick, threads=args.threads)
    print(markdown(result))
    print(
        f"\ntarget: batch 16 >= {TARGET_SPEEDUP:.0f}x batch 1 -> "
        f"{'met' if result[-1]['speedup'] >= TARGET_SPEEDUP else 'NOT met'}"
    )
