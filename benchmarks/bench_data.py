"""Data-loading throughput (images/s) of the training dataset + collator, without and with DataLoader workers.

    python -m benchmarks.bench_data [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from exgra_med.data.collate import DataCollator
from exgra_med.data.dataset import SupervisedDataset
from exgra_med.data.prepare.easy_vqa import prepare
from exgra_med.model.loading import load_pretrained
from exgra_med.model.tiny import make_tiny_model


def _images_per_second(dataset, collator, workers: int, batch_size: int, batches: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collator,
                            generator=torch.Generator().manual_seed(0), persistent_workers=False)
        start = time.perf_counter()
        seen = 0
        for i, batch in enumerate(loader):
            seen += batch["pixel_values"].shape[0]
            if i + 1 == batches:
                break
        rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates)


def run(quick: bool = False, image_size: int = 224) -> list[dict]:
    """Rows for 0 and 2 workers on stage-2 records (images resized to `image_size`, alignment texts on)."""
    torch.set_num_threads(1)
    batches, repeats = (4, 2) if quick else (12, 3)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root / "data", max_images=200, seed=0)
        out = make_tiny_model(root / "m", image_size=image_size, patch_size=16, hidden=64, layers=1)
        model, tokenizer, processor = load_pretrained(str(out))
        dataset = SupervisedDataset(root / "data" / "instruct.json", root / "data" / "images", tokenizer, processor,
                                    num_image_tokens=model.num_image_tokens, mm_use_im_start_end=True, alignment=True)
        collator = DataCollator(tokenizer)
        rows = []
        for workers in (0, 2):
            rate = _images_per_second(dataset, collator, workers, 32, batches, repeats)
            rows.append({"benchmark": "data", "workers": workers, "image_size": image_size, "batch_size": 32,
                         "images_per_s": round(rate, 1)})
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup"] = round(r["images_per_s"] / base, 2)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| workers | image size | batch | images/s | speedup |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['workers']} | {r['image_size']} | {r['batch_size']} | {r['images_per_s']:.1f} | "
              f"{r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(markdown(run(parser.parse_args().quick)))
