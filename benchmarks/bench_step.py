"""Stage-2 training step with the full ExGra-Med loss (after_de on) over the same step without it.

Same model, same batch, same optimizer; only `model.alignment` differs. Reported: median step time of each
and their ratio (target <= 1.3), plus the reference's arrangement (two separate extra LLM passes instead of
one batched pass) so that the gain of batching is visible.

    python -m benchmarks.bench_step [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from exgra_med.align import pool_tokens
from exgra_med.model.loading import ConnectorOptions, load_pretrained
from exgra_med.model.modeling import build_alignment
from exgra_med.model.tiny import make_tiny_model

SMALL = dict(hidden=256, layers=4, image_size=224, patch_size=16, vision_hidden=256, vision_layers=4, heads=4)
QUICK = dict(hidden=128, layers=2, image_size=64, patch_size=16, vision_hidden=64, vision_layers=2, heads=4)


def _batch(model, batch_size: int, text_len: int, response_len: int, extended_len: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    n_img = model.num_image_tokens
    low = 10  # ids below 10 are special tokens in the tiny tokenizer
    text = torch.randint(low, vocab, (batch_size, text_len), generator=g)
    # Random text must not hold the image tokens.
    special = torch.tensor(
        [i for i in (cfg.image_token_id, cfg.im_start_token_id, cfg.im_end_token_id) if i is not None]
    )
    plain = next(i for i in range(low, vocab) if i not in special.tolist())
    text[torch.isin(text, special)] = plain
    image = torch.full((batch_size, n_img), cfg.image_token_id)
    start = torch.full((batch_size, 1), cfg.im_start_token_id)
    end = torch.full((batch_size, 1), cfg.im_end_token_id)
    input_ids = torch.cat([text[:, :8], start, image, end, text[:, 8:]], dim=1)
    labels = input_ids.clone()
    labels[:, : 10 + n_img] = -100
    size = model.vision_tower.image_size
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        labels=labels,
        pixel_values=torch.randn(batch_size, 3, size, size, generator=g),
        response_ids=torch.randint(low, vocab, (batch_size, response_len), generator=g),
        response_mask=torch.ones(batch_size, response_len, dtype=torch.long),
        extended_ids=torch.randint(low, vocab, (batch_size, extended_len), generator=g),
        extended_mask=torch.ones(batch_size, extended_len, dtype=torch.long),
    )


def _reference_arrangement(model, batch: dict) -> torch.Tensor:
    """The reference's order of work: LM pass, then one LLM pass per alignment text."""
    out = model.language_model(
        inputs_embeds=model.merge_image_features(batch["input_ids"], batch["pixel_values"])[0],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
    )
    image = model.get_image_features(batch["pixel_values"]).mean(1)
    head, lm = model.alignment_head, model.language_model
    response = pool_tokens(head.encode_texts(lm, batch["response_ids"], batch["response_mask"]))
    extended = pool_tokens(head.encode_texts(lm, batch["extended_ids"], batch["extended_mask"]))
    return out.loss + model.config.alignment_config.alpha * model.alignment(image, response, extended).loss


def _prepared(quick: bool):
    shape = QUICK if quick else SMALL
    with tempfile.TemporaryDirectory() as tmp:
        options = ConnectorOptions(alignment=dict(contrastive=True, multi_graph=True, after_de=True))
        out = make_tiny_model(Path(tmp) / "m", options=options, **shape)
        model, _, _ = load_pretrained(str(out), dtype=torch.float32)
    model.train()
    model.requires_grad_(True)
    model.vision_tower.requires_grad_(False)
    alignment = model.alignment or build_alignment(model.config)
    batch = _batch(model, 16, text_len=64, response_len=32, extended_len=64)
    return model, alignment, batch


def _peak_rss_child(quick: bool, aligned: bool) -> None:
    """Run in a fresh process: print the peak RSS increase (MiB) over two training steps, sampled every 2 ms."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, alignment, batch = _prepared(quick)
    model.alignment = alignment if aligned else None
    with print_peak_rss_increase():
        _interleaved(model, batch, {"step": (model.alignment, lambda m, b: m(**b).loss)}, repeats=1)


@contextlib.contextmanager
def print_peak_rss_increase() -> Iterator[None]:
    """Print the peak increase (MiB) of this process's resident memory during the block, sampled every 2 ms (the
    last line of a `peak_memory` child process)."""
    import threading

    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()
    print((peak[0] - base) / 2**20)


def run_memory_children(commands: list[list[str]]) -> list[float]:
    """Run `print_peak_rss_increase` child processes one after the other and return the MiB each printed last.

    One at a time: side by side, their 2-thread steps would oversubscribe the cores of a small machine (and slow
    whatever else runs there many times over) for no gain in total CPU time."""
    import subprocess

    return [float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            for cmd in commands]


def peak_memory(quick: bool = False) -> dict:
    """Peak RSS increase (MiB) during stage-2 steps without / with alignment (CPU; a fresh process each)."""
    import sys

    cmds = [[sys.executable, "-m", "benchmarks.bench_step", "--child-memory", flag, *(["--quick"] if quick else [])]
            for flag in ("0", "1")]
    lm_only, exgra_med = run_memory_children(cmds)
    return {"rss_mib_lm_only": lm_only, "rss_mib_exgra_med": exgra_med, "rss_ratio": exgra_med / lm_only}


def _interleaved(model, batch: dict, arrangements: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Step times per arrangement, measured in rounds that run one step of each arrangement in turn.

    Interleaving keeps a slow drift of the machine's speed (other tenants of a shared CPU) out of the ratios: each
    round's ratio compares steps taken seconds apart. arrangements: name -> (alignment module or None, step).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times: dict[str, list[float]] = {name: [] for name in arrangements}
    for i in range(warmup + repeats):
        for name, (alignment, step) in arrangements.items():
            model.alignment = alignment
            t0 = time.perf_counter()
            loss = step(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def run(quick: bool = False, threads: int = 2) -> list[dict]:
    """Step times without / with alignment (batched and reference arrangement), batch 16, interleaved rounds.

    Times are medians over rounds; ratios are medians of the per-round ratios.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    repeats = 2 if quick else 7
    model, alignment, batch = _prepared(quick)

    def full_step(m, b):
        return m(**b).loss

    times = _interleaved(
        model,
        batch,
        {
            "lm_only": (None, full_step),
            "exgra_med": (alignment, full_step),
            "reference": (alignment, _reference_arrangement),
        },
        repeats,
    )
    model.alignment = alignment

    def ratio(name: str) -> float:
        return statistics.median(t / b for t, b in zip(times[name], times["lm_only"]))

    from benchmarks.bench_gpu import step_flops

    flops_ratio = step_flops(model, batch, True) / step_flops(model, batch, False)
    tokens = batch["input_ids"].shape[1]
    return [
        {
            "config": "quick" if quick else "small",
            "batch": 16,
            "seq_len": tokens,
            "flops_ratio": flops_ratio,
            "image_tokens": model.num_image_tokens,
            "threads": threads,
            "rounds": repeats,
            "step_s_lm_only": statistics.median(times["lm_only"]),
            "step_s_exgra_med": statistics.median(times["exgra_med"]),
            "step_s_reference_arrangement": statistics.median(times["reference"]),
            "ratio": ratio("exgra_med"),
            "ratio_reference_arrangement": ratio("reference"),
            "ratio_min_max": (
                min(t / b for t, b in zip(times["exgra_med"], times["lm_only"])),
                max(t / b for t, b in zip(times["exgra_med"], times["lm_only"])),
            ),
        },
    ]


def to_markdown(rows: list[dict]) -> str:
    """A markdown table of `run()`'s rows."""
    lines = [
        "| config | batch | seq len | image tokens | LM only (s) | ExGra-Med (s) | ratio (range over rounds) | "
        "model FLOPs ratio | reference arrangement (s) | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["ratio_min_max"]
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['seq_len']} | {r['image_tokens']} | {r['step_s_lm_only']:.3f} | "
            f"{r['step_s_exgra_med']:.3f} | {r['ratio']:.2f} ({lo:.2f}-{hi:.2f}) | {r['flops_ratio']:.2f} | "
            f"{r['step_s_reference_arrangement']:.3f} | {r['ratio_reference_arrangement']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child-memory", choices=("0", "1"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory is not None:
        _peak_rss_child(args.quick, args.child_memory == "1")
    else:
        print(to_markdown(run(args.quick, args.threads)))
        print(peak_memory(args.quick))
