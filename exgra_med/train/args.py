"""Argument groups of `exgra-med train` (the reference's flag names, plus every HF TrainingArguments flag)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import transformers

from exgra_med.align.config import AlignmentConfig, flag_name
from exgra_med.conversation import TEMPLATES
from exgra_med.data.images import ASPECT_RATIOS, DECODE_AUTO_MAX_IMAGES, DEFAULT_ASPECT_RATIO, IMAGE_CHECKS
from exgra_med.model.config import DENSE_CONNECTOR_TYPES, SELECT_FEATURES, check_projector_type
from exgra_med.model.quantization import QUANT_BITS, QUANT_TYPES


def _alignment_arguments() -> type:
    """`AlignmentArguments`: one flag per `AlignmentConfig` field (its `flag` name, type, default and help), except
    the seed, which is the run's `--seed`."""
    types = typing.get_type_hints(AlignmentConfig)
    flags = {flag_name(f): f for f in dataclasses.fields(AlignmentConfig) if f.metadata["cli"]}
    specs = [
        (flag, types[f.name], field(default=f.default, metadata={"help": f.metadata["help"]}))
        for flag, f in flags.items()
    ]

    def alignment_config(self, seed: int) -> AlignmentConfig:
        """The AlignmentConfig these flags set, its generator seeded with `seed` (the run's --seed)."""
        return AlignmentConfig.from_dict({**{flag: getattr(self, flag) for flag in flags}, "seed": seed})

    def __post_init__(self):
        self.alignment_config(seed=0)  # invalid values and combinations fail at parse time, naming the flag

    return dataclasses.make_dataclass(
        "AlignmentArguments", specs, kw_only=True,
        namespace={"__module__": __name__, "__doc__": "Alignment flags, generated from `AlignmentConfig`.",
                   "alignment_config": alignment_config, "__post_init__": __post_init__},
    )


AlignmentArguments = _alignment_arguments()


@dataclass
class ModelArguments(AlignmentArguments):
    """What model to build or load, and how it is connected and aligned (the alignment flags: `AlignmentArguments`)."""

    model_name_or_path: str = field(
        metadata={"help": "local causal-LM folder (Vicuna/LLaVA weights), an ExGra-Med checkpoint, or a "
                          "transformers-native VLM folder (Qwen2.5-VL, Gemma 3, LLaVA-OneVision, ...)"}
    )
    vision_tower: str | None = field(
        default=None, metadata={"help": "local CLIP/SigLIP folder, or local-dir:BIOMEDCLIP_DIR"}
    )
    mm_projector_type: str = field(default="mlp2x_gelu", metadata={"help": "linear | identity | mlp{N}x_gelu"})
    mm_dense_connector_type: str = field(default="none", metadata={"help": "none | sti | sci | dci"})
    num_l: int = field(default=6, metadata={"help": "DCI group size on BiomedCLIP"})
    mm_spatial_pool_stride: int = field(
        default=1,
        metadata={"help": "average s x s patches of the vision grid into one image token (1: none, the reference)"},
    )
    mm_vision_select_layer: int = field(default=-2, metadata={"help": "vision hidden layer fed to the projector"})
    mm_vision_select_feature: str = field(
        default="patch",
        metadata={"help": "tokens of that layer fed to the projector: patch (CLS dropped, the reference) | "
                          "cls_patch | cls (one token per image)"},
    )
    mm_use_im_start_end: bool = field(default=True, metadata={"help": "wrap image tokens in <im_start>/<im_end>"})
    tune_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "stage 1: train and save only the projector (+ <im_start>/<im_end> rows)"}
    )
    tune_im_start_end: bool = field(
        default=True,
        metadata={"help": "stage 1: also train the <im_start>/<im_end> input embeddings, as the reference"},
    )
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "stage-1 projector file or folder"})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the LLM (train projector + alignment)"})
    tune_vision_tower: bool = field(
        default=False,
        metadata={"help": "also train the vision encoder (the tower; of a native VLM, every part outside its "
                          "language model); the reference keeps it frozen"},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa | flash_attention_2 | eager"})
    lora_enable: bool = field(default=False, metadata={"help": "train LoRA adapters on the LLM (PEFT)"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    bits: int = field(
        default=16, metadata={"help": "LLM weights: 16 (as loaded) | 8 | 4 (QLoRA through bitsandbytes; with LoRA)"}
    )
    double_quant: bool = field(
        default=True, metadata={"help": "--bits 4: quantise the quantisation constants too (QLoRA's double quant)"}
    )
    quant_type: str = field(default="nf4", metadata={"help": "--bits 4 data type: nf4 | fp4"})

    def __post_init__(self):
        super().__post_init__()
        if self.bits not in QUANT_BITS:
            raise ValueError(f"--bits must be one of {QUANT_BITS}, got {self.bits}")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"--quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.bits < 16 and not self.lora_enable:
            raise ValueError(
                f"--bits {self.bits} trains LoRA adapters on the frozen quantised LLM: add --lora_enable True"
            )
        check_projector_type(self.mm_projector_type)
        if self.mm_dense_connector_type not in DENSE_CONNECTOR_TYPES:
            raise ValueError(f"--mm_dense_connector_type must be one of {DENSE_CONNECTOR_TYPES}")
        if self.mm_vision_select_feature not in SELECT_FEATURES:
            raise ValueError(f"--mm_vision_select_feature must be one of {SELECT_FEATURES}")
        if self.mm_spatial_pool_stride < 1:
            raise ValueError(f"--mm_spatial_pool_stride must be >= 1, got {self.mm_spatial_pool_stride}")
        if self.tune_mm_mlp_adapter and self.lora_enable:
            raise ValueError("--tune_mm_mlp_adapter (stage 1) trains only the projector; drop --lora_enable")
        if self.tune_vision_tower and (self.tune_mm_mlp_adapter or self.lora_enable):
            raise ValueError("--tune_vision_tower trains the vision encoder in full runs; drop it with "
                             + ("--tune_mm_mlp_adapter (stage 1 trains only the projector)" if self.tune_mm_mlp_adapter
                                else "--lora_enable (LoRA trains adapters on a frozen model)"))


@dataclass
class DataArguments:
    """Where the records and images are, and how conversations are rendered."""

    data_path: str = field(metadata={"help": "training records (JSON list)"})
    image_folder: str | None = field(
        default=None, metadata={"help": "folder the records' `image` paths are relative to"}
    )
    conv_template: str = field(default="llava_med", metadata={"help": "prompt template (llava_med = reference '###')"})
    image_check: str = field(
        default="auto",
        metadata={"help": "check every image before training: decode (every pixel: finds truncated files) | header "
                          "(existence, format, canvas size) | none | auto (decode up to "
                          f"{DECODE_AUTO_MAX_IMAGES} images, the header beyond)"},
    )
    skip_image_check: bool = field(default=False, metadata={"help": "the same as --image_check none"})
    drop_bad_records: bool = field(
        default=False,
        metadata={"help": "drop the records whose images fail the check (each logged, all listed in "
                          "OUTPUT_DIR/dropped_records.jsonl) instead of stopping"},
    )
    image_aspect_ratio: str = field(
        default=DEFAULT_ASPECT_RATIO,
        metadata={"help": "square: the processor's resize + centre crop (reference) | pad: pad to a square first"},
    )
    lazy_preprocess: bool = field(
        default=True, metadata={"help": "accepted for reference scripts; data is always lazy"}
    )
    val_data_path: str | None = field(default=None, metadata={"help": "VQA records scored during fine-tuning"})
    test_data_path: str | None = field(default=None, metadata={"help": "VQA records scored at the end"})
    evaluate_on_val: bool = field(default=False, metadata={"help": "generate answers on --val_data_path at each eval"})
    evaluate_on_test: bool = field(default=False, metadata={"help": "generate answers on --test_data_path at the end"})
    eval_max_new_tokens: int = field(
        default=1024, metadata={"help": "answer length limit of in-training VQA scoring (reference: 1024, cut at ###)"}
    )
    eval_batch_size: int = field(default=16, metadata={"help": "batch size of in-training answer generation"})

    def __post_init__(self):
        if self.conv_template not in TEMPLATES:
            raise ValueError(f"--conv_template must be one of {sorted(TEMPLATES)}, got {self.conv_template!r}")
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"--image_aspect_ratio must be one of {ASPECT_RATIOS}, got {self.image_aspect_ratio!r}")
        if self.image_check not in IMAGE_CHECKS:
            raise ValueError(f"--image_check must be one of {IMAGE_CHECKS}, got {self.image_check!r}")
        if self.skip_image_check:
            if self.image_check not in ("auto", "none"):
                raise ValueError(f"--skip_image_check True is --image_check none; drop one of them (got --image_check "
                                 f"{self.image_check})")
            self.image_check = "none"
        if self.drop_bad_records and self.image_check == "none":
            raise ValueError("--drop_bad_records True drops the records whose images fail the check; it needs "
                             "--image_check auto, decode or header")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """HF TrainingArguments plus the reference's extra fields."""

    model_max_length: int = field(default=2048, metadata={"help": "truncate conversations to this many tokens"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep alignment inputs (must stay False)"})
    report_to: str = field(default="none", metadata={"help": "logging integrations (none, tensorboard, wandb)"})
    padding_free: bool = field(
        default=False,
        metadata={"help": "pack each micro-batch into one row without padding (positions restart per sample); same "
                  "loss as padded, less compute when lengths vary"},
    )
    group_by_modality_length: bool = field(
        default=False,
        metadata={"help": "batches of one modality (image or text-only) and similar lengths, seeded (LLaVA's flag)"},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "replace a trained model already in --output_dir, or write over an input folder (refused "
                  "otherwise; --resume_from_checkpoint continues a run in its own folder)"},
    )
    save_at_steps: list[int] = field(
        default_factory=list,
        metadata={"help": "also write checkpoint-N at exactly these optimizer steps (e.g. 25 50 100 200 400 800: the "
                  "points of a learning curve), whatever --save_strategy says; all are kept"},
    )

    def __post_init__(self):
        super().__post_init__()
        if any(step < 1 for step in self.save_at_steps):
            raise ValueError(f"--save_at_steps takes optimizer steps >= 1, got {self.save_at_steps}")
        if self.save_at_steps and (self.save_total_limit or 0) > 0:
            raise ValueError("--save_at_steps keeps every checkpoint it asks for, which --save_total_limit would "
                             "delete; set --save_total_limit 0 (no rotation) or drop --save_at_steps")
        if self.group_by_modality_length and self.train_sampling_strategy not in ("random", None):
            raise ValueError(
                f"--group_by_modality_length chooses the training order itself; drop --train_sampling_strategy "
                f"{self.train_sampling_strategy}"
            )
