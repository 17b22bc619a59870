"""Figures (`exgra-med plot losses RUN_DIR` and `exgra-med plot efficiency RESULTS.csv`).

`losses` reads the Hugging Face Trainer's `trainer_state.json` (in RUN_DIR, or else in its newest
`checkpoint-*/`) and plots `loss`, `lm_loss` and `align_loss` against the step. `efficiency` reads a
CSV with columns `method, fraction, dataset, score` and plots the score against the fraction of
pre-training data, one line per method and one panel per dataset (the paper's 10/40/100% study); several
rows for one (method, fraction), e.g. seeds, are drawn as their mean with a +- std bar. `data-efficiency` is
another name for `efficiency`.
Figures are drawn with the Agg backend and written atomically.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from exgra_med.errors import HelpFormatter
from exgra_med.io import atomic_file, read_json

logger = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "lm_loss", "align_loss")
EFFICIENCY_COLUMNS = ("method", "fraction", "dataset", "score")


def find_trainer_state(run_dir: str | os.PathLike) -> Path:
    """`run_dir/trainer_state.json`, else the one in the checkpoint-N folder with the largest N."""
    run_dir = Path(run_dir)
    if (run_dir / "trainer_state.json").is_file():
        return run_dir / "trainer_state.json"
    ckpts = [p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    ckpts = [p for p in ckpts if (p / "trainer_state.json").is_file()]
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}: no trainer_state.json here or in a checkpoint-*/ folder")
    return max(ckpts, key=lambda p: int(p.name.split("-")[1])) / "trainer_state.json"


def loss_curves(state_path: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """`{key: (steps, values)}` for each of `LOSS_KEYS` logged in `log_history` (absent keys omitted)."""
    state = read_json(state_path)
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ValueError(f"{state_path}: no 'log_history' list")
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for i, entry in enumerate(history):
        for key in LOSS_KEYS:
            if key in entry:
                if "step" not in entry:
                    raise ValueError(f"{state_path}: log_history[{i}] has {key!r} but no 'step'")
                steps, values = curves.setdefault(key, ([], []))
                steps.append(int(entry["step"]))
                values.append(float(entry[key]))
    return curves


def read_efficiency(csv_path: str | os.PathLike) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """`{dataset: {method: [(fraction, score), ...] sorted by fraction}}` from the results CSV."""
    table: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in EFFICIENCY_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}")
        for line, row in enumerate(reader, 2):
            try:
                point = (float(row["fraction"]), float(row["score"]))
            except (TypeError, ValueError):
                raise ValueError(f"{csv_path}: line {line}: fraction and score must be numbers") from None
            table[row["dataset"].strip()][row["method"].strip()].append(point)
    return {d: {m: sorted(pts) for m, pts in methods.items()} for d, methods in table.items()}


def _save(fig, out: Path, dpi: int) -> Path:
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return out


def _figure(width: float, height: float):
    # lazy: matplotlib (about 1 s) only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib (about 1 s) only when a figure is drawn
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height))


def plot_losses(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, dpi: int = 100) -> Path:
    """Plot the loss curves of a run; default output `run_dir/losses.png`. Returns the PNG path."""
    curves = loss_curves(find_trainer_state(run_dir))
    if not curves:
        raise ValueError(f"{run_dir}: log_history holds none of {LOSS_KEYS}")
    plt, fig = _figure(8, 5)
    ax = fig.add_subplot(1, 1, 1)
    for key, (steps, values) in curves.items():
        ax.plot(steps, values, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    try:
        return _save(fig, Path(out) if out else Path(run_dir) / "losses.png", dpi)
    finally:
        plt.close(fig)


def _mean_and_std(values: dict, xs: Sequence) -> tuple[list[float], list[float]]:
    """Per x, the mean of its values (seeds) and their sample std (0 for one value)."""
    return ([statistics.fmean(values[x]) for x in xs],
            [statistics.stdev(values[x]) if len(values[x]) > 1 else 0.0 for x in xs])


def plot_efficiency(
    csv_path: str | os.PathLike, out: str | os.PathLike | None = None, dpi: int = 100
) -> Path:
    """Score vs. fraction of pre-training data, one panel per dataset; default `<csv>.png`."""
    table = read_efficiency(csv_path)
    if not table:
        raise ValueError(f"{csv_path}: no rows")
    plt, fig = _figure(4.5 * len(table), 4)
    for i, (dataset, methods) in enumerate(sorted(table.items())):
        ax = fig.add_subplot(1, len(table), i + 1)
        for method, points in sorted(methods.items()):
            by_fraction: dict[float, list[float]] = defaultdict(list)
            for fraction, score in points:  # several rows per fraction (seeds): mean +- std
                by_fraction[fraction].append(score)
            xs = sorted(by_fraction)
            means, stds = _mean_and_std(by_fraction, xs)
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.set_title(dataset)
        ax.set_xlabel("fraction of pre-training data")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        return _save(fig, Path(out) if out else Path(csv_path).with_suffix(".png"), dpi)
    finally:
        plt.close(fig)


def plot_learning_curves(csv_path: str | os.PathLike, out: str | os.PathLike, dpi: int = 100) -> Path:
    """Score vs. fine-tuning steps (step 0: the stage-2 model) from a CSV with columns `method, fraction, step,
    dataset, score`: one panel per (fraction, dataset), one line per method, the mean over seeds with a +- std band."""
    points: dict[tuple[float, str], dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            points[(float(row["fraction"]), row["dataset"])][row["method"]][int(row["step"])].append(
                float(row["score"]))
    if not points:
        raise ValueError(f"{csv_path}: no rows")
    fractions = sorted({k[0] for k in points})
    datasets = sorted({k[1] for k in points})
    plt, fig = _figure(4.5 * len(datasets), 3.6 * len(fractions))
    for i, key in enumerate((f, d) for f in fractions for d in datasets):
        if key not in points:
            continue
        ax = fig.add_subplot(len(fractions), len(datasets), i + 1)
        for method, by_step in sorted(points[key].items()):
            xs = sorted(by_step)
            means, stds = _mean_and_std(by_step, xs)
            ax.plot(xs, means, marker="o", label=method)
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
        ax.set_xscale("symlog", linthresh=25)
        ax.set_title(f"{key[1]}, {key[0]:g}% of the pre-training data")
        ax.set_xlabel("fine-tuning steps (0: stage-2 model)")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return _save(fig, Path(out), dpi)
    finally:
        plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """`exgra-med plot losses RUN_DIR [--out PNG]` or `exgra-med plot efficiency CSV [--out PNG]`."""
    parser = argparse.ArgumentParser(
        prog="exgra-med plot", description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    losses = sub.add_parser("losses", help="loss curves of a training run", formatter_class=HelpFormatter)
    losses.add_argument("run_dir", type=Path)
    efficiency = sub.add_parser(
        "efficiency", aliases=["data-efficiency"], help="score vs. fraction of pre-training data (mean +- std)",
        formatter_class=HelpFormatter,
    )
    efficiency.add_argument("csv", type=Path)
    for p in (losses, efficiency):
        p.add_argument("--out", type=Path, default=None, help="output PNG")
        p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG")
    args = parser.parse_args(argv)
    if args.kind == "losses":
        path = plot_losses(args.run_dir, args.out, args.dpi)
    else:
        path = plot_efficiency(args.csv, args.out, args.dpi)
    print(f"wrote {path}")
    return 0
