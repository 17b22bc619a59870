"""Stage-2 step of a transformers-native VLM with the ExGra-Med alignment head over the same step without it.

A Qwen2.5-VL-shaped model (its vision transformer with window attention and 2x2 merger, mrope LLM; small widths and
depths on the CPU), random weights, a batch of synthetic easy-VQA-like records rendered through the model's own
processor and chat template (`exgra_med.data.chat`), AdamW on the LLM + merger + head. Same module for both
arrangements, only `model.alignment` differs; steps interleaved in rounds (one of each per round), the ratio is the
median of the per-round ratios; times are the process's CPU time on one thread (the machine's other tenants stay out of
them). Rows with and without activation checkpointing (which also covers the extra text pass of the alignment).

    python -m benchmarks.bench_vlm [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

# name: (TinySize fields, image side in pixels, batch, words of question / answer / extended answer)
SHAPES = {
    "small": (dict(hidden=256, layers=4, heads=4, vision_hidden=128, vision_layers=4), 224, 8, (24, 16, 48)),
    "quick": (dict(hidden=64, layers=2, heads=4, vision_hidden=32, vision_layers=2), 112, 4, (12, 8, 24)),
}
WORDS = ("red green blue circle triangle rectangle shape image the a is of in on left right top bottom yes no "
         "lesion scan chest brain shows small large dark bright region").split()


def _records(n: int, words: tuple[int, int, int], seed: int) -> list[tuple[list[dict], Image.Image]]:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k)) + "."

    out = []
    for _ in range(n):
        q, a, long = words
        turns = [{"from": "human", "value": f"<image>\n{text(q)}"}, {"from": "gpt", "value": text(a)}]
        long_turns = [turns[0], {"from": "gpt", "value": text(long)}]
        image = Image.fromarray((torch.rand(224, 224, 3, generator=torch.Generator().manual_seed(rng.randrange(10**6)))
                                 * 255).to(torch.uint8).numpy())
        out.append(({"conversations": turns, "conversations_long": long_turns}, image))
    return out


def _prepared(shape: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from exgra_med.align.config import AlignmentConfig
    from exgra_med.data.chat import ChatEncoder, NativeCollator, record_messages, stop_strings
    from exgra_med.data.dataset import alignment_text
    from exgra_med.model.native.aligned import AlignedVLM
    from exgra_med.model.native.tiny import TinySize, make_tiny_vlm
    from exgra_med.model.native.training import set_native_trainable
    from exgra_med.train.args import ModelArguments

    size, side, batch_size, words = SHAPES[shape]
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_vlm(Path(tmp) / "m", "qwen2_5_vl", seed=0, size=TinySize(**size))
        vlm = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(folder)
    # Square images of `side` pixels: (side / 28)^2 merged image tokens each.
    processor.image_processor.size = {"shortest_edge": side * side, "longest_edge": side * side}
    model = AlignedVLM(vlm, AlignmentConfig(contrastive=True, multi_graph=True, after_de=True))
    set_native_trainable(model, ModelArguments(model_name_or_path=str(folder)))
    model.train()
    encoder = ChatEncoder(processor, stop_strings(processor, vlm.generation_config))
    items = []
    for i, (record, image) in enumerate(_records(batch_size, words, seed=0)):
        encoded = encoder.encode_training(record_messages(record["conversations"]), [image.resize((side, side))],
                                          f"record {i}")
        item = {"id": i, "encoded": encoded}
        for key, name in (("response_ids", "conversations"), ("extended_ids", "conversations_long")):
            item[key] = torch.tensor(processor.tokenizer(alignment_text(record[name]))["input_ids"])
        items.append(item)
    batch = NativeCollator(processor.tokenizer.pad_token_id)(items)
    return model, batch


def _interleaved(model, batch: dict, alignment, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times: dict[str, list[float]] = {"lm_only": [], "exgra_med": []}
    for i in range(warmup + repeats):
        for name, head in (("lm_only", None), ("exgra_med", alignment)):
            model.alignment = head
            t0 = time.process_time()  # this process's CPU time: other tenants of a shared CPU stay out of it
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                times[name].append(time.process_time() - t0)
    model.alignment = alignment
    return times


def run(quick: bool = False, threads: int = 1) -> list[dict]:
    """One row per activation-checkpointing setting: median step times and the with / without ratio."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape = "quick" if quick else "small"
    repeats = 3 if quick else 7
    rows = []
    for checkpointing in (False, True):
        model, batch = _prepared(shape)
        if checkpointing:
            model.activation_checkpointing_enable()
        times = _interleaved(model, batch, model.alignment, repeats)
        ratios = [t / b for t, b in zip(times["exgra_med"], times["lm_only"])]
        rows.append({
            "shape": shape, "checkpointing": checkpointing, "batch": batch["input_ids"].shape[0],
            "seq_len": batch["input_ids"].shape[1],
            "image_tokens": int((batch["input_ids"][0] == model.config.image_token_id).sum()),
            "text_tokens": (batch["response_ids"].shape[1], batch["extended_ids"].shape[1]),
            # the extra LLM pass's tokens over the training sequence's (the floor the method sets on the ratio)
            "extra_token_share": float((batch["response_mask"].sum() + batch["extended_mask"].sum())
                                       / batch["attention_mask"].sum()),
            "threads": threads, "rounds": repeats,
            "step_s_lm_only": statistics.median(times["lm_only"]),
            "step_s_exgra_med": statistics.median(times["exgra_med"]),
            "ratio": statistics.median(ratios), "ratio_min_max": (min(ratios), max(ratios)),
        })
    return rows


def to_markdown(rows: list[dict]) -> str:
    """A markdown table of `run()`'s rows."""
    lines = [
        "| model | activation checkpointing | batch | seq len | image tokens | alignment texts | extra LLM tokens | "
        "LM only (CPU s) | ExGra-Med (CPU s) | ratio (range over rounds) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lo, hi = r["ratio_min_max"]
        lines.append(
            f"| Qwen2.5-VL-shaped ({r['shape']}, CPU, {r['threads']} threads) | "
            f"{'on' if r['checkpointing'] else 'off'} | {r['batch']} | {r['seq_len']} | {r['image_tokens']} | "
            f"{r['text_tokens'][0]} + {r['text_tokens'][1]} | {r['extra_token_share']:.2f}x "
            f"| {r['step_s_lm_only']:.3f} | {r['step_s_exgra_med']:.3f} | {r['ratio']:.2f} ({lo:.2f}-{hi:.2f}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(to_markdown(run(args.quick, args.threads)))
