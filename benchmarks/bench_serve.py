"""Serving a mixed stream of short and long requests: static against continuous batching, in one run.

A tiny random model is built offline. The same arrival schedule (long answers every so often, short ones in between,
each with an image) is replayed against the engine with `batching="static"` and with `batching="continuous"`,
alternately, from one thread per request (the way the API and web servers call the engine). Answers have fixed
lengths (no stop string, no end of sequence). Reported per scheduler: the median and 95th-percentile latency of the
short requests (submit to last token), the long ones' median, and the throughput (generated tokens over the time from
the first arrival to the last answer); and each as a ratio to static batching.

    python -m benchmarks.bench_serve [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

MODES = ("static", "continuous")


@dataclasses.dataclass(frozen=True)
class Stream:
    """The arrival schedule: a long request every `long_every` s, `shorts_per_long` short ones evenly in between."""

    longs: int = 4
    long_tokens: int = 256
    short_tokens: int = 8
    shorts_per_long: int = 4
    long_every: float = 0.4

    def arrivals(self) -> list[tuple[float, int]]:
        """(seconds after the start, answer tokens) of every request, in arrival order."""
        out = []
        for i in range(self.longs):
            start = i * self.long_every
            out.append((start, self.long_tokens))
            gap = self.long_every / (self.shorts_per_long + 1)
            out += [(start + (j + 1) * gap, self.short_tokens) for j in range(self.shorts_per_long)]
        return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def replay(engine, stream: Stream, image: Image.Image) -> dict[str, list[float] | float]:
    """Send the stream's requests at their arrival times; latencies per request kind and the throughput."""
    from exgra_med.serve.engine import GenerationSettings  # lazy: the benchmark imports the package when it runs

    latencies: dict[int, list[float]] = {stream.long_tokens: [], stream.short_tokens: []}
    tokens, lock, start = [], threading.Lock(), time.perf_counter()

    def ask(at: float, n: int) -> None:
        time.sleep(max(0.0, start + at - time.perf_counter()))
        sent = time.perf_counter()
        job = engine.submit([("human", f"Describe finding {n} in the image.")], image, GenerationSettings(n))
        list(job.pieces())
        with lock:
            latencies[n].append(time.perf_counter() - sent)
            tokens.append(len(job.generated))

    threads = [threading.Thread(target=ask, args=arrival) for arrival in stream.arrivals()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"short": latencies[stream.short_tokens], "long": latencies[stream.long_tokens],
            "tokens_per_s": sum(tokens) / elapsed}


def run(quick: bool = False, threads: int = 1) -> list[dict]:
    """One row per scheduler: short-request p50/p95 latency, long p50, tokens/s, and their ratios to static."""
    from exgra_med.model.auto import LoadOptions  # lazy: as above
    from exgra_med.model.tiny import make_tiny_model  # lazy: as above
    from exgra_med.serve.engine import InferenceEngine  # lazy: as above

    torch.set_num_threads(threads)
    stream = Stream(longs=2, long_tokens=48, long_every=0.15) if quick else Stream()
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model(Path(tmp) / "model", seed=0)
        engines = {mode: InferenceEngine.from_path(str(Path(tmp) / "model"), LoadOptions(device="cpu"),
                                                   max_batch_size=8, batching=mode) for mode in MODES}
        backend = engines["static"].backend
        for engine in engines.values():
            engine.backend = backend
        # A template without a stop string and an EOS the model never reaches: every answer has its full length.
        backend.template = dataclasses.replace(backend.template, stop_str="")
        backend.tokenizer.eos_token_id = None
        image = Image.new("RGB", (64, 48), (200, 30, 30))
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}
        replay(engines["continuous"], Stream(longs=1, long_tokens=8, shorts_per_long=1), image)  # warm-up
        for _ in range(repeats):
            for mode in MODES:  # alternate, so that both see the same disturbances of a shared machine
                results[mode].append(replay(engines[mode], stream, image))
        largest = engines["continuous"].scheduler.largest_batch
        for engine in engines.values():
            engine.close()
    rows = []
    for mode in MODES:
        shorts = [x for r in results[mode] for x in r["short"]]
        longs = [x for r in results[mode] for x in r["long"]]
        rows.append({"benchmark": "serve", "batching": mode, "threads": threads, "repeats": repeats,
                     "requests": len(stream.arrivals()), "long_tokens": stream.long_tokens,
                     "short_tokens": stream.short_tokens,
                     "short_p50_s": statistics.median(shorts), "short_p95_s": _percentile(shorts, 0.95),
                     "long_p50_s": statistics.median(longs),
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results[mode])})
    base = rows[0]
    for row in rows:
        for key in ("short_p50_s", "short_p95_s", "tokens_per_s"):
            row[f"{key}_vs_static"] = round(row[key] / base[key], 3)
    rows[-1]["largest_batch"] = largest
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    r0 = rows[0]
    lines = [f"{r0['requests']} requests per round ({r0['long_tokens']}-token and {r0['short_tokens']}-token answers), "
             f"{r0['repeats']} rounds per scheduler, {r0['threads']} thread(s).", "",
             "| batching | short p50 s | short p95 s | long p50 s | tokens/s | short p50 / static | "
             "short p95 / static | throughput / static |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batching']} | {r['short_p50_s']:.3f} | {r['short_p95_s']:.3f} | {r['long_p50_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['short_p50_s_vs_static']:.2f}x | "
                     f"{r['short_p95_s_vs_static']:.2f}x | {r['tokens_per_s_vs_static']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    result = run(quick=args.quick, threads=args.threads)
    print(markdown(result))
    print(f"\nlargest continuous batch: {result[-1]['largest_batch']} rows")
