"""`AlignmentConfig`: every option of the stage-2 alignment objective, declared once.

The model config holds one (`ExGraMedConfig.alignment_config`, a nested dict in config.json), the loss modules are
built from it (`build_alignment_loss`) and the trainer's flags are generated from its fields (`exgra_med.train.args`).
Each field's metadata holds its help text and its `flag`: the trainer flag (``--<flag>``), which is also the flat
key that config.json files written before this class held (`LEGACY_KEYS`, migrated by `from_dict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from exgra_med.align.qap import BACKENDS, PAIR_ARRANGEMENTS

__all__ = ["CONTRASTIVE_LOSS_TYPES", "LEGACY_KEYS", "SIMILARITY_TYPES", "AlignmentConfig", "build_alignment_loss"]

CONTRASTIVE_LOSS_TYPES = ("infonce", "siglip")
SIMILARITY_TYPES = ("average", "OT")


def _option(default: Any, help: str, flag: str | None = None, cli: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag, "cli": cli})


@dataclass(frozen=True)
class AlignmentConfig:
    """Which alignment loss stage 2 adds to the LM loss (`loss = lm_loss + alpha * align_loss`), and its settings.

    Defaults reproduce the reference implementation (METHOD section 4); all off means plain LLaVA-Med training.
    """

    contrastive: bool = _option(False, "add an alignment loss to the LM loss (the reference's name for it)")
    multi_graph: bool = _option(False, "ExGra-Med multi-graph alignment; off: the contrastive ablation (needs "
                                       "--contrastive)")
    after_de: bool = _option(False, "align the LLM's last hidden states of the texts, not their input embeddings "
                                    "(needs --contrastive)")
    alpha: float = _option(1.0, "weight of the alignment loss (>= 0)")
    # Contrastive ablation (multi_graph off).
    contrastive_loss_type: str = _option("infonce", "ablation loss without --multi_graph: infonce | siglip")
    simi_type: str = _option("average", "ablation similarity: average (mean-pooled cosine) | OT (Sinkhorn plan)")
    ot_eps: float = _option(0.1, "entropic regularisation of the OT similarity (> 0)", "align_ot_eps")
    ot_max_iter: int = _option(500, "Sinkhorn iterations at most for the OT similarity (>= 1)", "align_ot_max_iter")
    # Multi-graph alignment.
    k: int = _option(5, "kNN neighbours of each node (capped at B - 1)", "align_k")
    lambda_val: float = _option(80.0, "black-box gradient interpolation strength (> 0)", "align_lambda")
    scale_invariant: bool = _option(False, "choose lambda per problem so the black-box gradient does not saturate "
                                           "and scales with --alpha", "align_scale_invariant")
    relative_lambda: float = _option(0.5, "with --align_scale_invariant: lambda as this fraction of the cost range "
                                          "over the upstream gradient (> 0)", "align_relative_lambda")
    undo_loss_scale: bool = _option(
        False, "under fp16 loss scaling (factor S), solve the black-box perturbation with the unscaled gradient and "
               "scale the result back, so the alignment gradient keeps its nominal size (reference, off: the "
               "saturated black-box gradient ignores S, so after unscaling it is 1/S of nominal)",
        "align_undo_loss_scale")
    noise_scale: float = _option(0.05, "Gumbel scale of the node and edge noise (>= 0)", "align_noise_scale")
    dropout: float = _option(0.1, "dropout after the GNN (in [0, 1))", "align_dropout")
    masked_mean: bool = _option(False, "exclude padding from the text means (reference: off)", "align_masked_mean")
    global_batch: bool = _option(False, "align the batch gathered across ranks (reference: each rank's own batch)",
                                 "align_global_batch")
    solver: str = _option("ipfp", f"graph-matching solver: {' | '.join(BACKENDS)}", "align_solver")
    solve_on: str | None = _option(None, "device the solver runs on (e.g. cpu); default: the nodes' device",
                                   "align_solve_on")
    solver_pairs: str = _option(
        "sparse", f"how the ipfp solver holds the quadratic costs: {' | '.join(PAIR_ARRANGEMENTS)} (sparse: per edge "
                  "pair, linear in the edges; dense: the earlier (E, B+1, B+1) table, cubic in B; same iterates up to "
                  "the order of float32 additions)", "align_solver_pairs")
    seed: int = _option(0, "seed of the alignment noise and GNN dropout; the trainer sets it from --seed",
                        "align_seed", cli=False)

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"alignment option {_label(name)} must be {expected}, got {getattr(self, name)!r}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise bad(f.name, "True or False")
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise bad(f.name, "an integer")
            if f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise bad(f.name, "a number")
                object.__setattr__(self, f.name, float(value))  # JSON may hold 1 for 1.0
        if self.contrastive_loss_type not in CONTRASTIVE_LOSS_TYPES:
            raise bad("contrastive_loss_type", f"one of {CONTRASTIVE_LOSS_TYPES}")
        if self.simi_type not in SIMILARITY_TYPES:
            raise bad("simi_type", f"one of {SIMILARITY_TYPES}")
        if self.solver not in BACKENDS:
            raise bad("solver", f"one of {BACKENDS}")
        if self.solver_pairs not in PAIR_ARRANGEMENTS:
            raise bad("solver_pairs", f"one of {PAIR_ARRANGEMENTS}")
        for name in ("lambda_val", "relative_lambda", "ot_eps"):
            if not getattr(self, name) > 0:
                raise bad(name, "> 0")
        for name in ("alpha", "noise_scale"):
            if not getattr(self, name) >= 0:
                raise bad(name, ">= 0")
        for name in ("k", "ot_max_iter"):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "in [0, 1)")
        for name in ("multi_graph", "after_de"):
            if getattr(self, name) and not self.contrastive:
                raise ValueError(f"alignment option {_label(name)} needs {_label('contrastive')} True")

    @property
    def enabled(self) -> bool:
        """True when stage-2 training adds an alignment loss to the LM loss."""
        return self.contrastive

    def to_dict(self) -> dict[str, Any]:
        """The nested `alignment_config` dict of config.json (field names)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None) -> AlignmentConfig:
        """From field names and/or the flat keys of older config.json files (`LEGACY_KEYS`); unknown keys raise."""
        return cls().replace(**dict(values or {}))

    def replace(self, **changes: Any) -> AlignmentConfig:
        """A copy with `changes` (field names or legacy flat keys) applied and validated."""
        names = {f.name for f in dataclasses.fields(self)}
        mapped: dict[str, Any] = {}
        for key, value in changes.items():
            name = key if key in names else LEGACY_KEYS.get(key)
            if name is None:
                raise ValueError(f"unknown alignment option {key!r}; known: {sorted(names)}")
            mapped[name] = value
        return dataclasses.replace(self, **mapped)

    @classmethod
    def coerce(cls, value: AlignmentConfig | Mapping[str, Any] | None) -> AlignmentConfig:
        """An AlignmentConfig from itself, a dict (see `from_dict`) or None (the defaults)."""
        if isinstance(value, AlignmentConfig):
            return value
        if value is None or isinstance(value, Mapping):
            return cls.from_dict(value)
        raise TypeError(f"alignment config must be an AlignmentConfig, a dict or None, got {type(value).__name__}")


def flag_name(f: dataclasses.Field) -> str:
    """The trainer flag (without `--`) of an AlignmentConfig field, which is also its flat config.json key."""
    return f.metadata["flag"] or f.name


def _label(name: str) -> str:
    flag = flag_name(next(f for f in dataclasses.fields(AlignmentConfig) if f.name == name))
    return f"{name} (--{flag})" if flag != name else f"--{name}"


# The flat keys (= trainer flag names) by field name's inverse: flat key -> field name.
LEGACY_KEYS: dict[str, str] = {flag_name(f): f.name for f in dataclasses.fields(AlignmentConfig)}


def build_alignment_loss(config: AlignmentConfig, dim: int) -> nn.Module | None:
    """The loss module `config` names for D-dimensional features, or None when `contrastive` is off."""
    if not config.contrastive:
        return None
    if config.multi_graph:
        # lazy: the options are read without torch_geometric (seconds) and the solver
        from exgra_med.align.loss import MultiGraphAlignmentLoss

        solver_kwargs: dict[str, Any] = {"backend": config.solver}
        if config.solve_on is not None:
            solver_kwargs["solve_on"] = config.solve_on
        if config.solver_pairs != AlignmentConfig().solver_pairs:
            solver_kwargs["pairs"] = config.solver_pairs
        return MultiGraphAlignmentLoss(
            dim, k=config.k, lambda_val=config.lambda_val, noise_scale=config.noise_scale, dropout=config.dropout,
            seed=config.seed, global_batch=config.global_batch, scale_invariant_grad=config.scale_invariant,
            relative_lambda=config.relative_lambda, solver_kwargs=solver_kwargs,
            undo_loss_scale=config.undo_loss_scale,
        )
    # lazy: the options are read without torch_geometric (seconds) and the solver
    from exgra_med.align.contrastive import ContrastiveAlignmentLoss

    return ContrastiveAlignmentLoss(dim, loss_type=config.contrastive_loss_type, simi_type=config.simi_type,
                                    ot_eps=config.ot_eps, ot_max_iter=config.ot_max_iter)
