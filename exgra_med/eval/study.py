"""`exgra-med data-efficiency record|summarize`: the result files of the data-efficiency study and their table.

`record` writes one cell's result (method, pre-training fraction, seed, the grounding audits of its stage-2 and
fine-tuned models, the seconds per step, the settings and the library versions) atomically, then its reproducibility
card beside it (`exgra_med.eval.card`: `<cell>.card.json`, with the commit); the study script
(scripts/data_efficiency.sh) calls it last, so a cell with a result file is finished. `summarize` reads every
cell file of a folder and writes `table.md` (mean +- std over seeds per method and fraction, per answer type,
beside the blank- and shuffled-image audit and the answer-prior baselines), `cells.csv` (one row per cell, the
input of `exgra-med plot data-efficiency`) and `figure.png`.

Protocol 2 (`results/data_efficiency.md`): a cell may also hold the audits of its fine-tuning checkpoints (`--curve
STEP=AUDIT`: a learning curve), the per-question real-image scores of its final and stage-2 models (`--questions`:
paired resampling), and its method may be a variant: `llava_med_matched` (LLaVA-Med given ExGra-Med's stage-2 wall
time) or `exgra_med_a<alpha>` (another alignment weight). `summarize` then adds the learning curves, the steps each
method needs to reach a score, the counterfactual rows, and each method minus LLaVA-Med paired by seed and question
with a bootstrap 95% interval; it names the commit(s) the cells ran on (from their cards). `audit` runs the
grounding audit of several models in one process (one start-up for a cell's checkpoints); `export` copies the
cells and their cards with the study folder's paths made relative, for publishing.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from exgra_med.errors import HelpFormatter
from exgra_med.eval.card import RunCard, card_path, file_entry, is_card, versions
from exgra_med.io import read_json, write_json_atomic, write_text_atomic

METHOD_NAMES = {
    "llava_med": "LLaVA-Med (alignment off)",
    "llava_med_matched": "LLaVA-Med, ExGra-Med's stage-2 wall time",
    "exgra_med": "ExGra-Med",
}
METHOD_PATTERN = re.compile(r"^(llava_med|llava_med_matched|exgra_med|exgra_med_a(\d+(\.\d+)?))$")
SCORE_KEYS = (("average", "overall"), ("closed_accuracy", "closed"), ("recall", "open"))
AUDIT_ROWS = ("real images", "blank images", "shuffled images")
BASELINE = "llava_med"
LEVELS = (60.0, 70.0, 80.0, 90.0)  # overall scores (real images) whose first step the learning-curve table reports
BOOTSTRAP = 2000


def method_name(method: str) -> str:
    """The table's name of a cell's method (`exgra_med_a0.25` -> "ExGra-Med, alpha 0.25")."""
    match = METHOD_PATTERN.match(method)
    if match and match.group(2):
        return f"ExGra-Med, alpha {float(match.group(2)):g}"
    return METHOD_NAMES.get(method, method)


def check_method(method: str) -> str:
    if not METHOD_PATTERN.match(method):
        raise ValueError(f"unknown method {method!r}: llava_med, llava_med_matched, exgra_med or exgra_med_a<alpha> "
                         "(e.g. exgra_med_a0.25)")
    return method


def _method_argument(method: str) -> str:
    try:
        return check_method(method)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _method_order(method: str) -> tuple[int, float]:
    match = METHOD_PATTERN.match(method)
    if match and match.group(2):
        return (len(METHOD_NAMES), float(match.group(2)))
    return (list(METHOD_NAMES).index(method) if method in METHOD_NAMES else 9, 0.0)


def _read_audit(path: str | Path) -> dict[str, Any]:
    audit = read_json(path)
    if not isinstance(audit, dict) or "rows" not in audit or "real images" not in audit["rows"]:
        raise ValueError(f"{path}: not a grounding-audit JSON (no rows['real images'])")
    return audit


def _audit_summary(path: str | Path, questions: Sequence[Mapping] | None = None) -> dict[str, Any]:
    """The audit's scores without its answers; with the questions, the per-question real-image scores too."""
    audit = _read_audit(path)
    controls = audit.get("counterfactual")
    summary = {
        "questions": audit["questions"],
        "rows": audit["rows"],
        "answers_changed_vs_real": audit.get("answers_changed_vs_real", {}),
        "counterfactual": {k: v for k, v in controls.items() if k != "answers"} if controls else None,
    }
    if questions is not None:
        # lazy: the metrics (nltk) only when a cell keeps per-question scores
        from exgra_med.eval.metrics import question_scores

        summary["per_question"] = question_scores(questions, audit["answers"]["real images"])
    return summary


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what}: expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def record(
    out: str | Path,
    method: str,
    fraction: float,
    seed: int,
    finetune_audit: str | Path,
    stage2_audit: str | Path | None,
    seconds: Mapping[str, float],
    settings: Mapping[str, str],
    curve: Mapping[int, str | Path] | None = None,
    questions: str | Path | None = None,
) -> dict:
    """Write one cell. `curve`: {fine-tuning step: audit of that checkpoint} (the learning curve; the final model's
    audit is `finetune_audit`); `questions`: the audited questions, to keep per-question real-image scores of the
    final and stage-2 models (for the paired bootstrap)."""
    records = read_json(questions) if questions else None
    result = {
        "method": check_method(method),
        "fraction": fraction,
        "seed": seed,
        "finetune": _audit_summary(finetune_audit, records),
        "stage2": _audit_summary(stage2_audit, records) if stage2_audit else None,
        "seconds": dict(seconds),
        "settings": dict(settings),
        "versions": versions(),
    }
    if curve:
        result["curve"] = {str(step): _audit_summary(path) for step, path in sorted(curve.items())}
    write_json_atomic(out, result)
    return result


def load_cells(folder: str | Path) -> list[dict]:
    cells = []
    for path in sorted(p for p in Path(folder).glob("*.json") if not is_card(p)):
        cell = read_json(path)
        missing = [k for k in ("method", "fraction", "seed", "finetune") if k not in cell]
        if missing:
            raise ValueError(f"{path}: not a data-efficiency cell (missing {missing})")
        card = card_path(path)
        cell["commit"] = read_json(card).get("code", {}).get("commit") if card.is_file() else None
        cells.append(cell)
    if not cells:
        raise ValueError(f"{folder}: no cell result files")
    return cells


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def _groups(cells: Sequence[Mapping]) -> dict[tuple[str, float], list[Mapping]]:
    groups: dict[tuple[str, float], list[Mapping]] = defaultdict(list)
    for cell in cells:
        groups[(cell["method"], float(cell["fraction"]))].append(cell)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][1], _method_order(kv[0][0]))))


def commits_line(cells: Sequence[Mapping]) -> str:
    """Which code the cells ran on (their cards' commits): one commit, or the list (a table from mixed code)."""
    commits = defaultdict(int)
    for cell in cells:
        commits[cell.get("commit") or "unknown (no card)"] += 1
    if len(commits) == 1:
        return f"All {len(cells)} cells ran on commit {next(iter(commits))}."
    listed = ", ".join(f"{c} ({n} cells)" for c, n in sorted(commits.items()))
    return f"The cells ran on {len(commits)} code versions: {listed}; the comparison is not from one commit."


def _curve_points(cell: Mapping) -> dict[int, Mapping]:
    """{step: audit summary}: 0 is the stage-2 model, the last the final fine-tuned model."""
    points = {int(k): v for k, v in cell.get("curve", {}).items()}
    if cell.get("stage2"):
        points[0] = cell["stage2"]
    return points


def _learning_curves(out: io.StringIO, groups: Mapping[tuple[str, float], list[Mapping]]) -> None:
    curved = {k: g for k, g in groups.items() if all(c.get("curve") for c in g)}
    if not curved:
        return
    steps = sorted({s for g in curved.values() for c in g for s in _curve_points(c)})
    head = " | ".join("stage 2" if s == 0 else str(s) for s in steps)
    measures = (("average", "overall", "real images"), ("closed_accuracy", "closed", "real images"),
                ("recall", "open", "real images"), ("recall", "open, multi-modal gain (real minus blank)", None))
    # {group: {step: the seeds' audit summaries}}, only the steps every seed of the group has
    by_step = {}
    for key, group in curved.items():
        curves = [_curve_points(c) for c in group]
        by_step[key] = {s: [c[s] for c in curves] for s in steps if all(s in c for c in curves)}
    for key, label, row in measures:
        out.write(f"\n### Learning curve: {label} after N fine-tuning steps (mean ± std over seeds)\n\n")
        out.write(f"| method | pre-training data | seeds | {head} |\n|---|---:|---:|" + "---:|" * len(steps) + "\n")
        for (method, fraction), group in curved.items():
            cols = []
            for step in steps:
                points = by_step[(method, fraction)].get(step)
                if points is None:
                    cols.append("")
                    continue
                if row:
                    cols.append(_mean_std([p["rows"][row][key] for p in points]))
                else:
                    cols.append(_mean_std([p["rows"]["real images"][key] - p["rows"]["blank images"][key]
                                           for p in points]))
            out.write(f"| {method_name(method)} | {fraction:g}% | {len(group)} | " + " | ".join(cols) + " |\n")
    out.write("\n### Fine-tuning steps to reach an overall score (real images, mean over seeds; - = not within "
              "the curve)\n\n| method | pre-training data | " + " | ".join(f"≥ {v:g}" for v in LEVELS)
              + " | best (step) |\n|---|---:|" + "---:|" * (len(LEVELS) + 1) + "\n")
    for (method, fraction), points_at in by_step.items():
        means = {step: statistics.fmean(p["rows"]["real images"]["average"] for p in points)
                 for step, points in points_at.items()}
        reach = [next((str(s) for s in sorted(means) if means[s] >= level), "-") for level in LEVELS]
        best = max(means, key=lambda s: (means[s], -s))
        out.write(f"| {method_name(method)} | {fraction:g}% | " + " | ".join(reach)
                  + f" | {means[best]:.2f} ({best}) |\n")


def _counterfactual(out: io.StringIO, groups: Mapping[tuple[str, float], list[Mapping]], model: str) -> None:
    kinds = ("colour, open", "colour, yes/no", "shape, open", "shape, yes/no")
    pairs = ("colour, yes/no", "shape, yes/no")
    audited = {k: [c[model]["counterfactual"] for c in g if c.get(model) and c[model].get("counterfactual")
                   and c[model]["counterfactual"].get("rows")]
               for k, g in groups.items()}
    audited = {k: v for k, v in audited.items() if v}
    if not audited:
        return
    what = "fine-tuned model" if model == "finetune" else "stage-2 model"
    out.write(f"\n### Counterfactual images, {what}: % of answers that follow the edited image's new truth; "
              "yes/no pairs right on both questions (mean ± std over seeds)\n\n| method | pre-training data | seeds | "
              + " | ".join(f"{k} follows" for k in kinds) + " | " + " | ".join(f"{k} pair" for k in pairs)
              + " |\n|---|---:|---:|" + "---:|" * (len(kinds) + len(pairs)) + "\n")
    for (method, fraction), controls in audited.items():
        cols = []
        for k in kinds:
            values = [c["rows"][k]["new"]["percent"] for c in controls if k in c["rows"]]
            cols.append(_mean_std(values) if len(values) == len(controls) else "")
        for k in pairs:
            values = [c["pairs"][k]["both right"]["percent"] for c in controls if k in c.get("pairs", {})]
            cols.append(_mean_std(values) if len(values) == len(controls) else "")
        out.write(f"| {method_name(method)} | {fraction:g}% | {len(controls)} | " + " | ".join(cols) + " |\n")


def paired_difference(
    a: Sequence[Mapping], b: Sequence[Mapping], model: str = "finetune", replicates: int = BOOTSTRAP, seed: int = 0,
) -> dict[str, Any] | None:
    """Method A minus method B on the same seeds (their shared stage 1) and the same questions: the mean difference
    of overall / closed / open (real images) and a percentile bootstrap 95% interval that resamples seeds and, within
    each answer type, questions (both paired). None when the cells share no seed with per-question scores."""
    import numpy as np  # lazy: only the protocol-2 tables need it

    by_seed_a = {c["seed"]: c[model]["per_question"] for c in a if c.get(model) and "per_question" in c[model]}
    by_seed_b = {c["seed"]: c[model]["per_question"] for c in b if c.get(model) and "per_question" in c[model]}
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    if not seeds:
        return None
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(seeds), size=(replicates, len(seeds)))
    point, samples, counts = {}, {}, {}
    for kind in ("closed", "open"):
        ids = sorted(set.intersection(*(set(by_seed_a[s][kind]) & set(by_seed_b[s][kind]) for s in seeds)))
        counts[kind] = len(ids)
        if not ids:
            point[kind], samples[kind] = 0.0, np.zeros(replicates)
            continue
        diff = 100.0 * np.array([[by_seed_a[s][kind][i] - by_seed_b[s][kind][i] for i in ids] for s in seeds])
        point[kind] = float(diff.mean())
        picks = rng.integers(0, len(ids), size=(replicates, len(ids)))
        per_seed = diff[:, picks].mean(axis=2).T  # [replicate, seed]: each seed's mean over the resampled questions
        samples[kind] = np.take_along_axis(per_seed, rows, axis=1).mean(axis=1)
    point["overall"] = (point["closed"] + point["open"]) / 2
    samples["overall"] = (samples["closed"] + samples["open"]) / 2
    interval = {k: tuple(float(x) for x in np.percentile(v, [2.5, 97.5])) for k, v in samples.items()}
    return {"seeds": seeds, "questions": counts, "difference": point, "ci95": interval}


def _comparisons(groups: Mapping[tuple[str, float], list[Mapping]]) -> list[tuple[str, str, float]]:
    """(method, minus method, fraction): every ExGra-Med variant minus LLaVA-Med; ExGra-Med minus the
    compute-matched LLaVA-Med, and that one minus LLaVA-Med."""
    out = []
    for method, fraction in groups:
        if method.startswith("exgra_med") and (BASELINE, fraction) in groups:
            out.append((method, BASELINE, fraction))
        if method == "exgra_med" and ("llava_med_matched", fraction) in groups:
            out.append((method, "llava_med_matched", fraction))
        if method == "llava_med_matched" and (BASELINE, fraction) in groups:
            out.append((method, BASELINE, fraction))
    return out


def _differences(out: io.StringIO, groups: Mapping[tuple[str, float], list[Mapping]]) -> None:
    rows = []
    for method, other, fraction in _comparisons(groups):
        for model in ("stage2", "finetune"):
            result = paired_difference(groups[(method, fraction)], groups[(other, fraction)], model)
            if result:
                rows.append((method, other, fraction, model, result))
    if not rows:
        return
    out.write(f"\n### Paired differences (same seeds and stage 1, same questions; real images; bootstrap 95% "
              f"interval over seeds and questions, {BOOTSTRAP} resamples)\n\n| comparison | pre-training data | model "
              "| seeds | overall | closed | open |\n|---|---:|---|---:|---:|---:|---:|\n")
    for method, other, fraction, model, r in rows:
        cols = [f"{r['difference'][k]:+.2f} [{r['ci95'][k][0]:+.2f}, {r['ci95'][k][1]:+.2f}]"
                for k in ("overall", "closed", "open")]
        what = "fine-tuned" if model == "finetune" else "stage 2"
        out.write(f"| {method_name(method)} minus {method_name(other)} | {fraction:g}% | {what} | {len(r['seeds'])} | "
                  + " | ".join(cols) + " |\n")


def table(cells: Sequence[Mapping]) -> str:
    """The markdown tables: fine-tuned scores with the audit, the zero-fine-tune (stage-2) scores, the baselines
    and the wall time per cell; with protocol-2 cells also the learning curves, the counterfactual rows and the
    paired differences. First line: the commit(s) the cells ran on."""
    groups = _groups(cells)
    out = io.StringIO()
    out.write(commits_line(cells) + "\n")

    def section(title: str, model: str) -> None:
        out.write(f"\n### {title}\n\n| method | pre-training data | seeds | images | overall | closed | open |\n")
        out.write("|---|---:|---:|---|---:|---:|---:|\n")
        for key, cells_of in groups.items():
            group = [c for c in cells_of if c.get(model)]
            if not group:
                continue
            for row in AUDIT_ROWS:
                values = [[c[model]["rows"][row][k] for c in group] for k, _ in SCORE_KEYS]
                out.write(
                    f"| {method_name(key[0])} | {key[1]:g}% | {len(group)} | {row.split()[0]} | "
                    + " | ".join(_mean_std(v) for v in values)
                    + " |\n"
                )

    section("After fine-tuning (mean ± std over seeds)", "finetune")
    section("Before fine-tuning: the stage-2 model (mean ± std over seeds)", "stage2")
    _differences(out, groups)
    _learning_curves(out, groups)
    _counterfactual(out, groups, "finetune")
    _counterfactual(out, groups, "stage2")
    first = cells[0]["finetune"]["rows"]
    baselines = [name for name in ("majority answer", "question prior") if name in first]
    if baselines:
        out.write(
            "\n### Answer-prior baselines (no model)\n\n| baseline | overall | closed | open |\n|---|---:|---:|---:|\n"
        )
        for name in baselines:
            out.write(f"| {name} | " + " | ".join(f"{first[name][k]:.2f}" for k, _ in SCORE_KEYS) + " |\n")
    out.write("\n### Wall time per cell (s; stage 1 is shared by all methods of a fraction and seed)\n\n")
    steps = sorted({k for c in cells for k in c.get("seconds", {})})
    extra = [k for k in ("stage2_steps",) if any(k in c.get("settings", {}) for c in cells)]
    out.write("| method | pre-training data | seed | " + " | ".join(steps + extra) + " |\n")
    out.write("|---|---:|---:|" + "---:|" * (len(steps) + len(extra)) + "\n")
    for cell in sorted(cells, key=lambda c: (float(c["fraction"]), _method_order(c["method"]), c["seed"])):
        sec = cell.get("seconds", {})
        out.write(
            f"| {method_name(cell['method'])} | {float(cell['fraction']):g}% | "
            f"{cell['seed']} | " + " | ".join(str(sec.get(k, "")) for k in steps)
            + "".join(f" | {cell.get('settings', {}).get(k, '')}" for k in extra) + " |\n"
        )
    return out.getvalue()


def summarize(cells_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    # lazy: matplotlib (through eval.plots) only when the figure is drawn
    from exgra_med.eval.plots import plot_efficiency, plot_learning_curves

    cells = load_cells(cells_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["method", "fraction", "dataset", "score", "seed"])
    for cell in cells:
        for key, label in SCORE_KEYS:
            writer.writerow(
                [
                    method_name(cell["method"]),
                    float(cell["fraction"]),
                    label,
                    round(cell["finetune"]["rows"]["real images"][key], 4),
                    cell["seed"],
                ]
            )
    write_text_atomic(out_dir / "cells.csv", rows.getvalue())
    write_text_atomic(out_dir / "table.md", table(cells))
    paths = {"table": out_dir / "table.md", "csv": out_dir / "cells.csv"}
    paths["figure"] = plot_efficiency(out_dir / "cells.csv", out_dir / "figure.png")
    curved = [c for c in cells if c.get("curve")]
    if curved:
        rows = io.StringIO()
        writer = csv.writer(rows)
        writer.writerow(["method", "fraction", "step", "dataset", "score", "seed"])
        for cell in curved:
            for step, point in sorted(_curve_points(cell).items()):
                for key, label in SCORE_KEYS:
                    writer.writerow([method_name(cell["method"]), float(cell["fraction"]), step, label,
                                     round(point["rows"]["real images"][key], 4), cell["seed"]])
        write_text_atomic(out_dir / "curve.csv", rows.getvalue())
        paths["curve_csv"] = out_dir / "curve.csv"
        paths["curve_figure"] = plot_learning_curves(out_dir / "curve.csv", out_dir / "curve.png")
    return paths


def matched_steps(baseline_run: str | Path, target_run: str | Path) -> int:
    """The steps that give the baseline run the target run's training time: the baseline's optimizer steps scaled by
    the ratio of the two runs' `train_runtime` (their trainer_state.json). A resumed run's runtime counts only its
    last part, so both must have run uninterrupted."""
    runs = []
    for folder in (baseline_run, target_run):
        path = Path(folder) / "trainer_state.json"
        if not path.is_file():
            raise ValueError(f"{path} not found: the run has not finished")
        state = read_json(path)
        runtime = next((e["train_runtime"] for e in reversed(state.get("log_history", [])) if "train_runtime" in e),
                       None)
        if not runtime or not state.get("global_step"):
            raise ValueError(f"{path}: no train_runtime or global_step in its log history")
        runs.append((state["global_step"], runtime))
    (steps, baseline), (_, target) = runs
    return max(1, round(steps * target / baseline))


def _relative(value: Any, root: str) -> Any:
    """`value` with every path string under `root` written relative to it (`root` itself as ".")."""
    if isinstance(value, str):
        return value.replace(root + "/", "").replace(root, ".")
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    return value


def export(cells_dir: str | Path, out_dir: str | Path, root: str | Path) -> list[Path]:
    """Copy every cell and its card to `out_dir` with the paths under `root` (the study's working directory) made
    relative, for publishing a study without the machine's folders; the scores are copied unchanged."""
    root = str(Path(root).resolve())
    out_dir = Path(out_dir)
    written = []
    for path in sorted(Path(cells_dir).glob("*.json")):
        target = out_dir / path.name
        write_json_atomic(target, _relative(read_json(path), root))
        written.append(target)
    if not written:
        raise ValueError(f"{cells_dir}: no cell result files")
    return written


def audit_models(pairs: Sequence[tuple[str, str]], audit_args: Sequence[str]) -> int:
    """`exgra-med grounding-audit --model M --out O AUDIT_ARGS` for each (M, O) whose O does not exist yet, in this
    process (one start-up for a cell's stage-2 model and fine-tuning checkpoints)."""
    from exgra_med.eval.grounding import main as grounding_main  # lazy: the model stack only for this subcommand

    for model, out in pairs:
        if Path(out).is_file():
            continue
        code = grounding_main(["--model", model, "--out", out, *audit_args])
        if code:
            return code
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    card = RunCard("data-efficiency", argv)
    parser = argparse.ArgumentParser(
        prog="exgra-med data-efficiency",
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="write one cell's result file", formatter_class=HelpFormatter)
    rec.add_argument("--out", required=True)
    rec.add_argument("--method", required=True, type=_method_argument,
                     help="llava_med, llava_med_matched (ExGra-Med's stage-2 wall time), exgra_med or "
                     "exgra_med_a<alpha>")
    rec.add_argument("--fraction", required=True, type=float, help="percentage of the pre-training data")
    rec.add_argument("--seed", required=True, type=int)
    rec.add_argument("--finetune-audit", required=True, help="grounding-audit JSON of the fine-tuned model")
    rec.add_argument("--stage2-audit", default=None, help="grounding-audit JSON of the stage-2 model")
    rec.add_argument("--curve", nargs="*", default=[], metavar="STEP=AUDIT",
                     help="grounding-audit JSON of the fine-tuning checkpoint at each step (the learning curve)")
    rec.add_argument("--questions", default=None,
                     help="the audited questions: keep per-question real-image scores (the paired bootstrap)")
    rec.add_argument("--seconds", nargs="*", default=[], metavar="STEP=S")
    rec.add_argument("--setting", nargs="*", default=[], metavar="KEY=VALUE")
    summ = sub.add_parser("summarize", help="table.md, cells.csv and figure.png from the cell files",
                          formatter_class=HelpFormatter)
    summ.add_argument("--cells", required=True, help="folder of cell result files")
    summ.add_argument("--out", required=True, help="output folder")
    match = sub.add_parser("matched-steps", formatter_class=HelpFormatter,
                           help="steps that give a run another run's training time (the compute-matched baseline)")
    match.add_argument("--baseline", required=True, help="finished run whose steps are scaled (e.g. LLaVA-Med's)")
    match.add_argument("--target", required=True, help="finished run whose train_runtime to match (ExGra-Med's)")
    exp = sub.add_parser("export", formatter_class=HelpFormatter,
                         help="copy the cells and cards with their paths made relative (for publishing)")
    exp.add_argument("--cells", required=True, help="folder of cell result files")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--root", default=".", help="the study's working directory: paths under it become relative")
    aud = sub.add_parser("audit", help="grounding audits of several models in one process",
                         formatter_class=HelpFormatter,
                         description="Runs `exgra-med grounding-audit --model MODEL --out OUT` plus every flag after "
                         "`--` for each --pair whose OUT does not exist yet.")
    aud.add_argument("--pair", nargs=2, action="append", required=True, metavar=("MODEL", "OUT"))
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "audit":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "audit":
        return audit_models(args.pair, [a for a in rest if a != "--"])
    if args.command == "export":
        written = export(args.cells, args.out, args.root)
        print(f"wrote {len(written)} files to {args.out}")
        return 0
    if args.command == "matched-steps":
        print(matched_steps(args.baseline, args.target))
        return 0
    if args.command == "record":
        seconds = {k: float(v) for k, v in _pairs(args.seconds, "--seconds").items()}
        settings = _pairs(args.setting, "--setting")
        curve = {}
        for step, path in _pairs(args.curve, "--curve").items():
            if not step.isdigit():
                raise ValueError(f"--curve: expected STEP=AUDIT with a step number, got {step}={path}")
            curve[int(step)] = path
        record(args.out, args.method, args.fraction, args.seed, args.finetune_audit, args.stage2_audit, seconds,
               settings, curve=curve, questions=args.questions)
        # the audits' entries name their own cards (the commit, model and decoding settings they ran with)
        card.write(args.out, {
            "method": args.method,
            "fraction": args.fraction,
            "finetune_audit": file_entry(args.finetune_audit),
            "stage2_audit": file_entry(args.stage2_audit) if args.stage2_audit else None,
            "curve": {str(k): file_entry(v) for k, v in sorted(curve.items())},
            "seconds": seconds,
            "settings": settings,
        }, seed=args.seed)
        print(f"wrote {args.out} and its reproducibility card")
    else:
        paths = summarize(args.cells, args.out)
        print(Path(paths["table"]).read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
