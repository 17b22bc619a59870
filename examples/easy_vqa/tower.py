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

The same command pre-trains the vision encoder of a transformers-native VLM (`--tower` a folder that
`AutoModelForImageTextToText` loads, e.g. `make-tiny-model --arch qwen2_5_vl`): the image side is the model's own
image features after its projector / merger (what its language model and the ExGra-Med alignment see, through the
model's own processor and chat template), mean-pooled per image and projected; the encoder and projector train, the
language model is left as it is, and the whole model is written back in its native format with its processor
(`--tokenizer` defaults to the model's own). The demo's native path starts stage 2 from it
(`DEMO_ARCH=qwen2_5_vl make demo`).
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
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
)

from exgra_med.cli import quiet_optional_backends
from exgra_med.constants import GPT
from exgra_med.data.images import check_record_images, load_image, preprocess_image
from exgra_med.data.records import RecordError, load_records, record_label
from exgra_med.errors import UserError
from exgra_med.model.auto import native_model_type
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


def _unit(features) -> torch.Tensor:  # transformers 5 returns CLIP's projected features as `pooler_output`
    return nn.functional.normalize(getattr(features, "pooler_output", features), dim=-1)


@torch.no_grad()
def _retrieval(module: nn.Module, encode_texts, encode_images, captions: Sequence[str], tokenizer,
               max_tokens: int) -> float:
    """Share of images whose most similar caption, among the distinct captions, is their own: `encode_texts(ids,
    mask)` embeds the distinct captions, `encode_images(start, stop)` the images in that slice (in caption order);
    `module` is evaluated in eval mode and left in train mode."""
    module.eval()
    distinct = sorted(set(captions))
    ids, mask = tokenize_captions(tokenizer, distinct, max_tokens)
    text = _unit(encode_texts(ids, mask))
    correct = 0
    for start in range(0, len(captions), 256):
        best = (_unit(encode_images(start, start + 256)) @ text.T).argmax(-1)
        correct += sum(distinct[b] == c for b, c in zip(best.tolist(), captions[start : start + 256]))
    module.train()
    return correct / max(1, len(captions))


def retrieval_accuracy(
    model: CLIPModel, pixels: torch.Tensor, captions: Sequence[str], tokenizer, max_tokens: int
) -> float:
    """Share of images whose most similar caption, among the distinct captions, is their own."""
    return _retrieval(model, lambda ids, mask: model.get_text_features(input_ids=ids, attention_mask=mask),
                      lambda a, b: model.get_image_features(pixel_values=pixels[a:b]), captions, tokenizer, max_tokens)


class ClipTowerPair:
    """A CLIP vision tower and a small text transformer in transformers' `CLIPModel` (its own contrastive loss)."""

    def __init__(self, tower: str | Path, tokenizer_path: str | Path | None, config: TowerPretrainConfig):
        if tokenizer_path is None:
            raise UserError(f"--tokenizer is required for a CLIP vision tower ({tower}): the captions' tokenizer")
        vision = CLIPVisionModel.from_pretrained(tower)
        self.processor = CLIPImageProcessor.from_pretrained(tower)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.config = config
        vcfg = vision.config
        text_config = _text_config(self.tokenizer, vcfg.hidden_size, vcfg.num_attention_heads, config)
        clip_config = CLIPConfig(
            text_config=text_config.to_dict(), vision_config=vcfg.to_dict(), projection_dim=vcfg.projection_dim
        )
        self.model = CLIPModel(clip_config)
        self.model.vision_model.load_state_dict(vision.state_dict())  # CLIPModel.vision_model is a CLIPVisionModel
        self.pixels = None

    def prepare(self, images: Sequence) -> None:
        """Decode-once: every image preprocessed (the records of a demo fit in memory many times over)."""
        self.pixels = torch.stack([preprocess_image(img, self.processor, self.config.aspect_ratio) for img in images])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def train(self) -> None:
        self.model.train()

    def loss(self, images: list[int], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, pixel_values=self.pixels[images], return_loss=True).loss

    def retrieval(self, images: list[int], captions: Sequence[str]) -> float:
        return retrieval_accuracy(self.model, self.pixels[images], captions, self.tokenizer,
                                  self.config.max_caption_tokens)

    def save(self, folder: Path) -> None:
        self.model.vision_model.save_pretrained(folder)
        self.processor.save_pretrained(folder)


class NativeVLMPair(nn.Module):
    """A native VLM's image features (after its projector, through its processor and chat template, mean-pooled per
    image, projected) against a small CLIP text transformer, with CLIP's symmetric loss. The language model stays
    frozen; everything else of the VLM (vision encoder, projector / merger) trains."""

    def __init__(self, folder: str | Path, tokenizer_path: str | Path | None, config: TowerPretrainConfig):
        super().__init__()
        # Here, not at the top: the CLIP tower's path needs none of these (a shorter start-up).
        from open_clip.loss import ClipLoss
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from exgra_med.data.chat import ChatEncoder
        from exgra_med.model.native.aligned import text_hidden_size
        from exgra_med.model.native.training import vision_side_parameters

        self.vlm = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        self.processor = AutoProcessor.from_pretrained(folder)
        self.tokenizer = (AutoTokenizer.from_pretrained(tokenizer_path) if tokenizer_path is not None
                          else self.processor.tokenizer)
        self.config = config
        hidden = text_hidden_size(self.vlm)
        heads = int(self.vlm.config.get_text_config().num_attention_heads)
        text_config = _text_config(self.tokenizer, hidden, heads, config)
        text_config.projection_dim = hidden
        self.text = CLIPTextModelWithProjection(text_config)
        self.image_projection = nn.Linear(hidden, hidden, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.clip_loss = ClipLoss()  # open_clip's symmetric image-text cross-entropy
        self.vlm.requires_grad_(False)
        for p in vision_side_parameters(self.vlm):
            p.requires_grad_(True)
        if not any(p.requires_grad for p in self.vlm.parameters()):
            raise UserError(f"{folder}: found no vision encoder or projector outside the language model to train")
        self.encoder = ChatEncoder(self.processor, stops=[], image_aspect_ratio=config.aspect_ratio)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.inputs: list = []

    def prepare(self, images: Sequence) -> None:
        """Each image through the model's processor once, as the one image of a user turn of its chat template."""
        chat = [{"role": "user", "content": [{"type": "image"}]}]
        self.inputs = [self.encoder.encode_prompt(chat, [self.encoder.prepare_image(img)]) for img in images]

    def image_embeds(self, images: Sequence[int]) -> torch.Tensor:
        from exgra_med.data.chat import collate_encoded
        from exgra_med.model.alignment_head import sample_image_features

        batch = collate_encoded([self.inputs[i] for i in images], self.pad_id)
        counts = batch.pop("images_per_sample")
        batch.pop("labels", None)
        out = self.vlm(**batch, use_cache=False)
        features = sample_image_features(out.image_outputs.pooler_output, counts)[:, 0]  # (B, D)
        return self.image_projection(features)

    def loss(self, images: list[int], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        image = _unit(self.image_embeds(images))
        text = _unit(self.text(input_ids=ids, attention_mask=mask).text_embeds)
        return self.clip_loss(image, text, self.logit_scale.exp())

    def retrieval(self, images: list[int], captions: Sequence[str]) -> float:
        return _retrieval(self, lambda ids, mask: self.text(input_ids=ids, attention_mask=mask).text_embeds,
                          lambda a, b: self.image_embeds(images[a:b]), captions, self.tokenizer,
                          self.config.max_caption_tokens)

    def trainable_parameters(self) -> list[nn.Parameter]:  # the frozen language model left out
        return [p for p in self.parameters() if p.requires_grad]

    def save(self, folder: Path) -> None:
        self.vlm.save_pretrained(folder)
        self.processor.save_pretrained(folder)


def pretrain_tower(
    tower: str | Path,
    tokenizer_path: str | Path | None,
    data: str | Path,
    image_folder: str | Path,
    out: str | Path,
    config: TowerPretrainConfig,
) -> dict:
    """Train the vision encoder at `tower` (a CLIP vision tower, or a native VLM folder) contrastively on `data`'s
    captions; write it to `out` (a CLIP vision tower folder, or the whole native VLM)."""
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
    native = native_model_type(tower)
    model = NativeVLMPair(tower, tokenizer_path, config) if native else ClipTowerPair(tower, tokenizer_path, config)
    tokenizer = model.tokenizer

    distinct_images = sorted({image for image, _ in pairs})
    index = {image: i for i, image in enumerate(distinct_images)}
    model.prepare([load_image(image_folder / image) for image in distinct_images])
    heldout = set(
        random.Random(f"{config.seed}-heldout").sample(
            distinct_images, int(round(config.heldout_fraction * len(distinct_images)))
        )
    )
    train = [(index[i], c) for i, c in pairs if i not in heldout]
    held = [(index[i], c) for i, c in pairs if i in heldout]
    held_images = [i for i, _ in held]
    held_captions = [c for _, c in held]

    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    rng = random.Random(f"{config.seed}-batches")
    order: list[int] = []
    history = []
    before = model.retrieval(held_images, held_captions) if held else None
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
        loss = model.loss([train[b][0] for b in batch], ids, mask)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"tower pre-training: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % config.eval_every == 0 or step == config.steps:
            row = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - start, 1)}
            if held:
                row["heldout_retrieval"] = round(model.retrieval(held_images, held_captions), 4)
            history.append(row)
            print("   " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)

    summary = {
        "tower": str(tower),
        "kind": native or "clip_vision_model",
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
        model.save(tmp)
        write_json(summary, tmp / "pretrain_tower.json")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `python -m examples.easy_vqa.tower --tower DIR --tokenizer DIR --data F --image-folder DIR --out DIR`."""
    quiet_optional_backends()
    defaults = TowerPretrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m examples.easy_vqa.tower",
        description="Contrastive (CLIP) pre-training of a CLIP vision tower (writes a CLIPVisionModel folder usable "
        "as --vision_tower) or of a native VLM's vision encoder (writes the whole model) on image-caption records.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tower", required=True, help="CLIP vision tower folder to start from (CLIPVisionModel), or a "
                   "transformers-native VLM folder (its vision encoder and projector train; the whole model is "
                   "written)")
    p.add_argument("--tokenizer", help="tokenizer folder for the captions (e.g. the LLM's); required for a CLIP tower, "
                   "a native VLM's own by default")
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
