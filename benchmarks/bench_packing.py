"""Padding-free batches (`--padding_free True`) against padded ones: training tokens/s and peak memory, with and
without the alignment, on micro-batches whose lengths follow a LLaVA-Med-instruct-like mix.

Both arrangements go through the training collator (`DataCollator`) and the model's forward + backward + AdamW
step; tokens/s counts the real (non-padding) tokens of the LM sequences, the same for both. Each round runs one step
of every arrangement on the same micro-batch (interleaved: the machine's drift stays out of the ratios), the
micro-batch changes from round to round, and ratios are medians of the per-round ratios.

The length mix (modelled on LLaVA-Med's instruct data, GPT-4-written multi-turn conversations about one figure; it
is not measured from that data): 1-5 question/answer rounds (uniform), questions log-normal with median 16 tokens,
answers log-normal with median 60 tokens (sigma 0.5 and 0.8), 8 template tokens per turn, a 24-token system prompt,
256 image tokens (CLIP ViT-L/14 at 224 px) per sample; the alignment's extended answers are 1.0-2.0x the answers.

    python -m benchmarks.bench_packing [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_step import print_peak_rss_increase, run_memory_children
from exgra_med.constants import IGNORE_INDEX
from exgra_med.data.collate import DataCollator
from exgra_med.model.loading import ConnectorOptions, load_pretrained
from exgra_med.model.modeling import build_alignment
from exgra_med.model.tiny import make_tiny_model

# An LLM whose matrix products dominate a step; image tokens as LLaVA-Med's (224 / 14 = 16 x 16); micro-batch 16 as
# the reference's stage 2 (per device). The vision tower is frozen and small: it costs the same in both arrangements.
SMALL = dict(hidden=256, layers=2, heads=4, image_size=224, patch_size=14, vision_hidden=64, vision_layers=1)
QUICK = dict(hidden=128, layers=2, heads=4, image_size=112, patch_size=14, vision_hidden=32, vision_layers=1)
BATCH = {"small": 16, "quick": 8}
ALIGNMENT = dict(contrastive=True, multi_graph=True, after_de=True, masked_mean=True)  # text pass packs too
SYSTEM_TOKENS, TURN_TOKENS = 24, 8


def sample_lengths(rng: np.random.Generator, max_text: int) -> tuple[int, int, int, int]:
    """(prompt tokens, answer tokens, response-text tokens, extended-text tokens) of one conversation of the mix."""
    rounds = int(rng.integers(1, 6))
    questions = np.maximum(3, rng.lognormal(np.log(16), 0.5, rounds)).astype(int)
    answers = np.maximum(2, rng.lognormal(np.log(60), 0.8, rounds)).astype(int)
    prompt = SYSTEM_TOKENS + int(questions.sum()) + TURN_TOKENS * rounds
    answer = int(answers.sum()) + TURN_TOKENS * rounds
    scale = min(1.0, max_text / (prompt + answer))
    extended = int((answers * rng.uniform(1.0, 2.0, rounds)).sum())
    return int(prompt * scale), max(2, int(answer * scale)), int(answers.sum()), extended


def make_items(model, rng: np.random.Generator, batch_size: int, max_length: int = 2048) -> list[dict]:
    """Dataset-like items (input_ids, labels, pixel_values, alignment text ids) with the mix's lengths."""
    cfg = model.config
    vocab, n_img = cfg.text_config.vocab_size, model.num_image_tokens
    special = {cfg.image_token_id, cfg.im_start_token_id, cfg.im_end_token_id}
    plain = np.array([i for i in range(10, vocab) if i not in special])
    size = model.vision_tower.image_size
    items = []
    for i in range(batch_size):
        prompt, answer, response, extended = sample_lengths(rng, max_length - n_img - 2)
        text = torch.from_numpy(rng.choice(plain, prompt + answer)).long()
        image = torch.tensor([cfg.im_start_token_id] + [cfg.image_token_id] * n_img + [cfg.im_end_token_id])
        input_ids = torch.cat([text[:SYSTEM_TOKENS], image, text[SYSTEM_TOKENS:]])
        labels = input_ids.clone()
        labels[: len(input_ids) - answer] = IGNORE_INDEX
        items.append(dict(
            id=i, input_ids=input_ids, labels=labels, pixel_values=torch.randn(3, size, size),
            response_ids=torch.from_numpy(rng.choice(plain, response)).long(),
            extended_ids=torch.from_numpy(rng.choice(plain, extended)).long(),
        ))
    return items


def _model(quick: bool):
    with tempfile.TemporaryDirectory() as tmp:
        out = make_tiny_model(Path(tmp) / "m", options=ConnectorOptions(alignment=ALIGNMENT),
                              **(QUICK if quick else SMALL))
        model, tokenizer, _ = load_pretrained(str(out), dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    model.requires_grad_(True)
    model.vision_tower.requires_grad_(False)
    alignment = model.alignment or build_alignment(model.config)
    return model, tokenizer, alignment


ARRANGEMENTS = {  # name -> DataCollator options
    "padded": dict(),
    "padding_free": dict(padding_free=True),  # rows within the longest sample (what sdpa / eager train on)
    "one_row": dict(padding_free=True, one_row=True),  # one row (flash-attention's layout): dense (L, L) mask in sdpa
}


def _batch_tokens(batch: dict) -> int:
    return int(batch["input_ids"].numel())


def run(quick: bool = False, threads: int = 2, one_row: bool = False) -> list[dict]:
    """Rows (alignment off / on) x (padded, padding-free [, one row, alignment off]) with tokens/s and ratios."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = "quick" if quick else "small"
    batch_size, rounds = BATCH[config], 2 if quick else 7
    model, tokenizer, alignment = _model(quick)
    micro_batches = [make_items(model, rng, batch_size) for _ in range(rounds + 1)]  # round 0 warms up
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)  # alignment included
    cases = [(False, "padded"), (False, "padding_free")] + [(False, "one_row")] * one_row
    cases += [(True, "padded"), (True, "padding_free")]
    times = {case: [] for case in cases}
    cpu_times = {case: [] for case in cases}  # this process's CPU seconds: less disturbed by other tenants
    tokens = {case: [] for case in cases}
    lengths = []
    for r, items in enumerate(micro_batches):
        lengths += [len(x["input_ids"]) for x in items]
        for aligned, name in cases:
            batch = DataCollator(tokenizer, **ARRANGEMENTS[name])(items)
            batch.pop("ids")
            if not aligned:
                batch = {k: v for k, v in batch.items() if k not in ("response_ids", "response_mask", "extended_ids",
                                                                      "extended_mask")}
            model.alignment = alignment if aligned else None
            t0, c0 = time.perf_counter(), time.process_time()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r:
                times[(aligned, name)].append(time.perf_counter() - t0)
                cpu_times[(aligned, name)].append(time.process_time() - c0)
                tokens[(aligned, name)].append(_batch_tokens(batch))
    model.alignment = alignment
    real = [sum(len(x["input_ids"]) for x in items) for items in micro_batches[1:]]
    rows = []
    for aligned, name in cases:
        t, cpu = times[(aligned, name)], cpu_times[(aligned, name)]
        base, cpu_base = times[(aligned, "padded")], cpu_times[(aligned, "padded")]
        rows.append({
            "config": config, "alignment": aligned, "arrangement": name,
            "batch": batch_size, "threads": threads, "rounds": rounds,
            "step_s": statistics.median(t),
            "tokens_per_s": statistics.median(n / s for n, s in zip(real, t)),
            "computed_tokens": statistics.median(n / m for n, m in zip(tokens[(aligned, name)], real)),
            "speedup": statistics.median(b / s for b, s in zip(base, t)),
            "speedup_range": (min(b / s for b, s in zip(base, t)), max(b / s for b, s in zip(base, t))),
            "cpu_speedup": statistics.median(b / s for b, s in zip(cpu_base, cpu)),
        })
    rows[0]["length_percentiles"] = [int(np.percentile(lengths, q)) for q in (0, 10, 50, 90, 100)]
    return rows


def _peak_rss_child(quick: bool, aligned: bool, name: str) -> None:
    """In a fresh process: the peak RSS increase (MiB) over two training steps, sampled every 2 ms."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tokenizer, alignment = _model(quick)
    model.alignment = alignment if aligned else None
    items = make_items(model, np.random.default_rng(1), BATCH["quick" if quick else "small"])
    batch = DataCollator(tokenizer, **ARRANGEMENTS[name])(items)
    batch.pop("ids")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with print_peak_rss_increase():
        for _ in range(2):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def peak_memory(quick: bool = False) -> list[dict]:
    """Peak RSS increase (MiB) of two training steps on the same micro-batch, padded vs padding-free (CPU; a fresh
    process each); `quick` measures the arrangements with the alignment only (2 processes instead of 4)."""
    import sys

    alignment = (True,) if quick else (False, True)
    cells = [(aligned, name) for aligned in alignment for name in ("padded", "padding_free")]
    cmds = [[sys.executable, "-m", "benchmarks.bench_packing", "--child-memory", f"{int(aligned)}:{name}",
             *(["--quick"] if quick else [])] for aligned, name in cells]
    return [{"alignment": aligned, "arrangement": name, "rss_mib": mib}
            for (aligned, name), mib in zip(cells, run_memory_children(cmds))]


def to_markdown(rows: list[dict], memory: list[dict] | None = None) -> str:
    """A markdown table of `run()`'s rows (and `peak_memory()`'s, when given)."""
    rss = {(m["alignment"], m["arrangement"]): m["rss_mib"] for m in memory or []}
    lines = [
        "| alignment | arrangement | LM tokens computed / real | step s | real tokens/s | speedup (range) | "
        "speedup in CPU time | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lo, hi = r["speedup_range"]
        mem = rss.get((r["alignment"], r["arrangement"]))
        lines.append(
            f"| {'on' if r['alignment'] else 'off'} | {r['arrangement']} | {r['computed_tokens']:.2f} | "
            f"{r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) | "
            f"{r['cpu_speedup']:.2f}x | {'-' if mem is None else f'{mem:.0f}'} |"
        )
    return "\n".join(lines)


def describe(rows: list[dict]) -> str:
    """One line on the setting of `run()`'s rows."""
    r = rows[0]
    p = r["length_percentiles"]
    return (f"{r['config']} config, micro-batch {r['batch']}, {r['threads']} threads, {r['rounds']} interleaved "
            f"rounds; sample lengths (image + text tokens) min / p10 / median / p90 / max: "
            f"{' / '.join(map(str, p))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one-row", action="store_true", help="also time all samples in one row (sdpa: dense mask)")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory is not None:
        aligned, name = args.child_memory.split(":")
        _peak_rss_child(args.quick, aligned == "1", name)
    else:
        result = run(args.quick, args.threads, args.one_row)
        print(describe(result))
        print(to_markdown(result, peak_memory(args.quick)))
