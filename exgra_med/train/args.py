"""Argument groups of `exgra-med train` (the reference's flag names, plus every HF TrainingArguments flag)."""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers

from exgra_med.model.config import CONTRASTIVE_LOSS_TYPES, DENSE_CONNECTOR_TYPES, SIMILARITY_TYPES, check_projector_type


@dataclass
class ModelArguments:
    """What model to build or load, and how it is connected and aligned."""

    model_name_or_path: str = field(metadata={"help": "local causal-LM folder (Vicuna/LLaVA weights) or an ExGra-Med checkpoint"})
    vision_tower: str | None = field(default=None, metadata={"help": "local CLIP/SigLIP folder, or local-dir:BIOMEDCLIP_DIR"})
    mm_projector_type: str = field(default="mlp2x_gelu", metadata={"help": "linear | identity | mlp{N}x_gelu"})
    mm_dense_connector_type: str = field(default="none", metadata={"help": "none | sti | sci | dci"})
    num_l: int = field(default=6, metadata={"help": "DCI group size on BiomedCLIP"})
    mm_vision_select_layer: int = field(default=-2, metadata={"help": "vision hidden layer fed to the projector"})
    mm_use_im_start_end: bool = field(default=True, metadata={"help": "wrap image tokens in <im_start>/<im_end>"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train and save only the projector"})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "stage-1 projector file or folder"})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the LLM (train projector + alignment)"})
    contrastive: bool = field(default=False, metadata={"help": "add an alignment loss to the LM loss"})
    multi_graph: bool = field(default=False, metadata={"help": "ExGra-Med multi-graph alignment (needs contrastive)"})
    after_de: bool = field(default=False, metadata={"help": "align LLM hidden states of the texts, not embeddings"})
    alpha: float = field(default=1.0, metadata={"help": "weight of the alignment loss"})
    contrastive_loss_type: str = field(default="infonce", metadata={"help": "ablation without multi_graph: infonce | siglip"})
    simi_type: str = field(default="average", metadata={"help": "ablation similarity: average | OT"})
    align_lambda: float = field(default=80.0, metadata={"help": "black-box gradient interpolation strength"})
    align_masked_mean: bool = field(default=False, metadata={"help": "exclude padding from text means (reference: off)"})
    align_global_batch: bool = field(default=False, metadata={"help": "align over the batch gathered across ranks"})
    align_scale_invariant: bool = field(default=False, metadata={"help": "scale-invariant black-box gradient"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa | flash_attention_2 | eager"})
    lora_enable: bool = field(default=False, metadata={"help": "train LoRA adapters on the LLM (PEFT)"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})

    def __post_init__(self):
        check_projector_type(self.mm_projector_type)
        if self.mm_dense_connector_type not in DENSE_CONNECTOR_TYPES:
            raise ValueError(f"--mm_dense_connector_type must be one of {DENSE_CONNECTOR_TYPES}")
        if self.multi_graph and not self.contrastive:
            raise ValueError("--multi_graph True needs --contrastive True")
        if self.after_de and not self.contrastive:
            raise ValueError("--after_de True needs --contrastive True")
        if self.contrastive_loss_type not in CONTRASTIVE_LOSS_TYPES:
            raise ValueError(f"--contrastive_loss_type must be one of {CONTRASTIVE_LOSS_TYPES}")
        if self.simi_type not in SIMILARITY_TYPES:
            raise ValueError(f"--simi_type must be one of {SIMILARITY_TYPES}")
        if self.tune_mm_mlp_adapter and self.lora_enable:
            raise ValueError("--tune_mm_mlp_adapter (stage 1) trains only the projector; drop --lora_enable")

    def alignment_config(self) -> dict:
        """The ExGraMedConfig alignment fields these flags set."""
        return dict(
            contrastive=self.contrastive,
            multi_graph=self.multi_graph,
            after_de=self.after_de,
            alpha=self.alpha,
            contrastive_loss_type=self.contrastive_loss_type,
            simi_type=self.simi_type,
            align_lambda=self.align_lambda,
            align_masked_mean=self.align_masked_mean,
            align_global_batch=self.align_global_batch,
            align_scale_invariant=self.align_scale_invariant,
        )


@dataclass
class DataArguments:
    """Where the records and images are, and how conversations are rendered."""

    data_path: str = field(metadata={"help": "training records (JSON list)"})
    image_folder: str | None = field(default=None, metadata={"help": "folder the records' `image` paths are relative to"})
    conv_template: str = field(default="llava_med", metadata={"help": "prompt template (llava_med = reference '###')"})
    image_aspect_ratio: str = field(default="pad", metadata={"help": "pad (to square) | square (resize as is)"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "accepted for reference scripts; data is always lazy"})
    val_data_path: str | None = field(default=None, metadata={"help": "VQA records scored during fine-tuning"})
    test_data_path: str | None = field(default=None, metadata={"help": "VQA records scored at the end"})
    evaluate_on_val: bool = field(default=False, metadata={"help": "generate answers on --val_data_path at each eval"})
    evaluate_on_test: bool = field(default=False, metadata={"help": "generate answers on --test_data_path at the end"})
    eval_max_new_tokens: int = field(default=32, metadata={"help": "answer length during in-training VQA scoring"})
    eval_batch_size: int = field(default=16, metadata={"help": "batch size of in-training answer generation"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """HF TrainingArguments plus the reference's extra fields."""

    model_max_length: int = field(default=2048, metadata={"help": "truncate conversations to this many tokens"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep alignment inputs (must stay False)"})
    report_to: str = field(default="none", metadata={"help": "logging integrations (none, tensorboard, wandb)"})
