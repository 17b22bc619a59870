"""Contrastive (CLIP) pre-training of the demo's CLIP vision tower on image-caption records.

Real users start stage 1 from a pretrained CLIP (LLaVA-Med: CLIP ViT-L/14, ExGra-Med also BiomedCLIP). The
offline demo has no such checkpoint, and a frozen *random* tower encodes colour but barely shape, so the demo's
model could not learn to read its images. This command gives the demo what real users have, on its own data:
the tower is trained with CLIP's symmetric contrastive loss (transformers' `CLIPModel(return_loss=True)`) against
a small text transformer over the records' captions (the first gpt turn of each record, e.g. stage 1's
`alignment.json`), and written back as a `CLIPVisionModel` folder with its image processor, a drop-in
`--vision_tower`. A seeded share of the images is held out; zero-shot caption retrieval on them (each held-out
image against every distinct caption) is printed during training and saved in `pretrain_tower.json`.

    python -m examples.easy_vqa.tower --tower runs/demo/tiny/vision --tokenizer runs/demo/tiny/llm \\
        --data runs/demo/data/alignment.json --image-folder runs/demo/data/images --out runs/demo/tower
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionModel

from exgra_med.cli import quiet_optional_backends
from exgra_med.constants import GPT
from exgra_med.data.images import check_record_images, load_image, preprocess_image
from exgra_med.data.records import RecordError, load_records, record_label
from exgra_med.model.checkpoint import check_output_dir, staged_output_dir, write_json

logger = logging.getLogger(__name__)


@dataclass
class TowerPretrainConfig:
    steps: int = 600
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    text_layers: int = 2
    max_caption_tokens: int = 32
    heldout_fraction: float = 0.1
    eval_every: int = 100
    aspect_ratio: str = "pad"
    seed: int = 0


def caption_pairs(records: Sequence[dict], source: str) -> list[tuple[str, str]]:
    """(image, caption) per record: the record's image and its first gpt turn."""
    pairs = []
    for index, record in enumerate(records):
        if "image" not in record:
            raise RecordError(
                f"{source}: {record_label(record, index)}: field 'image' is required for tower pre-training"
            )
        caption = next(turn["value"] for turn in record["conversations"] if turn["from"] == GPT).strip()
        pairs.append((record["image"], caption))
    return pairs


def _text_config(tokenizer, hidden: int, heads: int, config: TowerPretrainConfig) -> CLIPTextConfig:
    """A small CLIP text transformer over the tokenizer's ids plus one end-of-caption id (= len(tokenizer)).

    CLIP pools the text at its eos token; the extra id is the largest, so both of transformers' pooling rules
    (the eos id, and the legacy argmax of the ids used when eos_token_id == 2) find it."""
    end = len(tokenizer)
    return CLIPTextConfig(
        vocab_size=end + 1,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=config.text_layers,
        num_attention_heads=heads,
        max_position_embeddings=config.max_caption_tokens,
        pad_token_id=0,
        bos_token_id=end,
        eos_token_id=end,
    )


def tokenize_captions(tokenizer, captions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids followed by the end-of-caption id (see `_text_config`), right-padded; (ids, attention mask)."""
    end = len(tokenizer)
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"][: max_tokens - 1] + [end] for c in captions]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def retrieval_accuracy(
    model: CLIPModel, pixels: torch.Tensor, captions: Sequence[str], tokenizer, max_tokens: int
) -> float:
    """Share of images whose most similar caption, among the distinct captions, is their own."""
    model.eval()

    def unit(features) -> torch.Tensor:  # transformers 5 returns the projected features as `pooler_output`
        return torch.nn.functional.normalize(getattr(features, "pooler_output", features), dim=-1)

    distinct = sorted(set(captions))
    ids, mask = tokenize_captions(tokenizer, distinct, max_tokens)
    text = unit(model.get_text_features(input_ids=ids, attention_mask=mask))
    correct = 0
    for start in range(0, len(pixels), 256):
        image = unit(model.get_image_features(pixel_values=pixels[start : start + 256]))
        best = (image @ text.T).argmax(-1)
        correct += sum(distinct[b] == c for b, c in zip(best.tolist(), captions[start : start + 256]))
    model.train()
    return correct / max(1, len(pixels))


def pretrain_tower(
    tower: str | Path,
    tokenizer_path: str | Path,
    data: str | Path,
    image_folder: str | Path,
    out: str | Path,
    config: TowerPretrainConfig,
) -> dict:
    """Train the CLIP vision tower at `tower` contrastively on `data`'s captions; write it to `out`."""
    # Here, not at the top: transformers' optimization module imports bitsandbytes, whose import-time warning `main`
    # silences first (as the `exgra-med` commands do).
    from transformers import get_cosine_schedule_with_warmup

    check_output_dir(out)
    records = load_records(data)
    pairs = caption_pairs(records, str(data))
    if len(pairs) < 2:
        raise RecordError(f"{data}: contrastive pre-training needs at least 2 image-caption records, got {len(pairs)}")
    image_folder = Path(image_folder)
    check_record_images(records, image_folder, str(data))  # every image's header, before any training

    torch.manual_seed(config.seed)
    vision = CLIPVisionModel.from_pretrained(tower)
    processor = CLIPImageProcessor.from_pretrained(tower)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    vcfg = vision.config
    text_config = _text_config(tokenizer, vcfg.hidden_size, vcfg.num_attention_heads, config)
    clip_config = CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vcfg.to_dict(), projection_dim=vcfg.projection_dim
    )
    model = CLIPModel(clip_config)
    model.vision_model.load_state_dict(vision.state_dict())  # CLIPModel.vision_model is a CLIPVisionModel

    # Images are decoded and preprocessed once (the records of a demo fit in memory many times over).
    distinct_images = sorted({image for image, _ in pairs})
    index = {image: i for i, image in enumerate(distinct_images)}
    pixels = torch.stack(
        [
            preprocess_image(load_image(image_folder / image), processor, config.aspect_ratio)
            for image in distinct_images
        ]
    )
    heldout = set(
        random.Random(f"{config.seed}-heldout").sample(
            distinct_images, int(round(config.heldout_fraction * len(distinct_images)))
        )
    )
    train = [(index[i], c) for i, c in pairs if i not in heldout]
    held = [(index[i], c) for i, c in pairs if i in heldout]
    held_pixels = pixels[[i for i, _ in held]] if held else pixels[:0]
    held_captions = [c for _, c in held]

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    rng = random.Random(f"{config.seed}-batches")
    order: list[int] = []
    history = []
    before = (
        retrieval_accuracy(model, held_pixels, held_captions, tokenizer, config.max_caption_tokens) if held else None
    )
    logger.info(
        "tower pre-training: %d train / %d held-out pairs; held-out retrieval before: %s", len(train), len(held), before
    )
    start = time.time()
    model.train()
    for step in range(1, config.steps + 1):
        if len(order) < config.batch_size:
            fresh = list(range(len(train)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[: config.batch_size], order[config.batch_size :]
        ids, mask = tokenize_captions(tokenizer, [train[b][1] for b in batch], config.max_caption_tokens)
        loss = model(
            input_ids=ids, attention_mask=mask, pixel_values=pixels[[train[b][0] for b in batch]], return_loss=True
        ).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"tower pre-training: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % config.eval_every == 0 or step == config.steps:
            row = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - start, 1)}
            if held:
                row["heldout_retrieval"] = round(
                    retrieval_accuracy(model, held_pixels, held_captions, tokenizer, config.max_caption_tokens), 4
                )
            history.append(row)
            print("   " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)

    summary = {
        "tower": str(tower),
        "data": str(data),
        "pairs": {"train": len(train), "heldout": len(held)},
        "distinct_captions": len(set(c for _, c in pairs)),
        "heldout_retrieval_before": before,
        "heldout_retrieval_after": history[-1].get("heldout_retrieval") if history else None,
        "config": asdict(config),
        "history": history,
        "seconds": round(time.time() - start, 1),
    }
    with staged_output_dir(out) as tmp:
        model.vision_model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(summary, tmp / "pretrain_tower.json")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `python -m examples.easy_vqa.tower --tower DIR --tokenizer DIR --data F --image-folder DIR --out DIR`."""
    quiet_optional_backends()
    defaults = TowerPretrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m examples.easy_vqa.tower",
        description="Contrastive (CLIP) pre-training of a CLIP vision tower on image-caption records; "
        "writes a CLIPVisionModel folder usable as --vision_tower.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tower", required=True, help="CLIP vision tower folder to start from (CLIPVisionModel)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder for the captions (e.g. the LLM's)")
    p.add_argument("--data", required=True, help="records with an image and a caption (first gpt turn)")
    p.add_argument("--image-folder", required=True)
    p.add_argument("--out", required=True, help="output folder (absent or empty)")
    for name, value in asdict(defaults).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = TowerPretrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    summary = pretrain_tower(args.tower, args.tokenizer, args.data, args.image_folder, args.out, config)
    print(
        f"tower written to {args.out}: held-out caption retrieval {summary['heldout_retrieval_before']} -> "
        f"{summary['heldout_retrieval_after']} in {summary['seconds']} s"
    )
    return 0


if __name__ == "__main__":
    import sys

    from exgra_med.cli import run_command

    raise SystemExit(run_command(main, sys.argv[1:], "python -m examples.easy_vqa.tower"))
