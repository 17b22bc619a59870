"""`exgra-med data-efficiency record|summarize`: the result files of the data-efficiency study and their table.

`record` writes one cell's result (method, pre-training fraction, seed, the grounding audits of its stage-2 and
fine-tuned models, the seconds per step, the settings and the library versions) atomically, then its reproducibility
card beside it (`exgra_med.eval.card`: `<cell>.card.json`, with the commit); the study script
(scripts/data_efficiency.sh) calls it last, so a cell with a result file is finished. `summarize` reads every
cell file of a folder and writes `table.md` (mean +- std over seeds per method and fraction, per answer type,
beside the blank- and shuffled-image audit and the answer-prior baselines), `cells.csv` (one row per cell, the
input of `exgra-med plot data-efficiency`) and `figure.png`.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from exgra_med.errors import HelpFormatter
from exgra_med.eval.card import RunCard, file_entry, is_card, versions
from exgra_med.io import read_json, write_json_atomic, write_text_atomic

METHOD_NAMES = {"llava_med": "LLaVA-Med (alignment off)", "exgra_med": "ExGra-Med"}
SCORE_KEYS = (("average", "overall"), ("closed_accuracy", "closed"), ("recall", "open"))
AUDIT_ROWS = ("real images", "blank images", "shuffled images")


def _audit_summary(path: str | Path) -> dict[str, Any]:
    audit = read_json(path)
    if not isinstance(audit, dict) or "rows" not in audit or "real images" not in audit["rows"]:
        raise ValueError(f"{path}: not a grounding-audit JSON (no rows['real images'])")
    return {
        "questions": audit["questions"],
        "rows": audit["rows"],
        "answers_changed_vs_real": audit.get("answers_changed_vs_real", {}),
    }


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
) -> dict:
    result = {
        "method": method,
        "fraction": fraction,
        "seed": seed,
        "finetune": _audit_summary(finetune_audit),
        "stage2": _audit_summary(stage2_audit) if stage2_audit else None,
        "seconds": dict(seconds),
        "settings": dict(settings),
        "versions": versions(),
    }
    write_json_atomic(out, result)
    return result


def load_cells(folder: str | Path) -> list[dict]:
    cells = []
    for path in sorted(p for p in Path(folder).glob("*.json") if not is_card(p)):
        cell = read_json(path)
        missing = [k for k in ("method", "fraction", "seed", "finetune") if k not in cell]
        if missing:
            raise ValueError(f"{path}: not a data-efficiency cell (missing {missing})")
        cells.append(cell)
    if not cells:
        raise ValueError(f"{folder}: no cell result files")
    return cells


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(cells: Sequence[Mapping]) -> str:
    """The markdown tables: fine-tuned scores with the audit, the zero-fine-tune (stage-2) scores, the baselines
    and the wall time per cell."""
    groups: dict[tuple[str, float], list[Mapping]] = defaultdict(list)
    for cell in cells:
        groups[(cell["method"], float(cell["fraction"]))].append(cell)
    order = sorted(groups, key=lambda k: (k[1], list(METHOD_NAMES).index(k[0]) if k[0] in METHOD_NAMES else 9))
    out = io.StringIO()

    def section(title: str, model: str) -> None:
        out.write(f"\n### {title}\n\n| method | pre-training data | seeds | images | overall | closed | open |\n")
        out.write("|---|---:|---:|---|---:|---:|---:|\n")
        for key in order:
            group = [c for c in groups[key] if c.get(model)]
            if not group:
                continue
            for row in AUDIT_ROWS:
                values = [[c[model]["rows"][row][k] for c in group] for k, _ in SCORE_KEYS]
                name = METHOD_NAMES.get(key[0], key[0])
                out.write(
                    f"| {name} | {key[1]:g}% | {len(group)} | {row.split()[0]} | "
                    + " | ".join(_mean_std(v) for v in values)
                    + " |\n"
                )

    section("After fine-tuning (mean ± std over seeds)", "finetune")
    section("Before fine-tuning: the stage-2 model (mean ± std over seeds)", "stage2")
    first = cells[0]["finetune"]["rows"]
    baselines = [name for name in ("majority answer", "question prior") if name in first]
    if baselines:
        out.write(
            "\n### Answer-prior baselines (no model)\n\n| baseline | overall | closed | open |\n|---|---:|---:|---:|\n"
        )
        for name in baselines:
            out.write(f"| {name} | " + " | ".join(f"{first[name][k]:.2f}" for k, _ in SCORE_KEYS) + " |\n")
    out.write("\n### Wall time per cell (s; stage 1 is shared by both methods of a fraction and seed)\n\n")
    steps = sorted({k for c in cells for k in c.get("seconds", {})})
    out.write("| method | pre-training data | seed | " + " | ".join(steps) + " |\n")
    out.write("|---|---:|---:|" + "---:|" * len(steps) + "\n")
    for cell in sorted(cells, key=lambda c: (float(c["fraction"]), c["method"], c["seed"])):
        sec = cell.get("seconds", {})
        out.write(
            f"| {METHOD_NAMES.get(cell['method'], cell['method'])} | {float(cell['fraction']):g}% | "
            f"{cell['seed']} | " + " | ".join(str(sec.get(k, "")) for k in steps) + " |\n"
        )
    return out.getvalue()


def summarize(cells_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    # lazy: matplotlib (through eval.plots) only when the figure is drawn
    from exgra_med.eval.plots import plot_efficiency

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
                    METHOD_NAMES.get(cell["method"], cell["method"]),
                    float(cell["fraction"]),
                    label,
                    round(cell["finetune"]["rows"]["real images"][key], 4),
                    cell["seed"],
                ]
            )
    write_text_atomic(out_dir / "cells.csv", rows.getvalue())
    write_text_atomic(out_dir / "table.md", table(cells))
    figure = plot_efficiency(out_dir / "cells.csv", out_dir / "figure.png")
    return {"table": out_dir / "table.md", "csv": out_dir / "cells.csv", "figure": figure}


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
    rec.add_argument("--method", required=True, choices=sorted(METHOD_NAMES))
    rec.add_argument("--fraction", required=True, type=float, help="percentage of the pre-training data")
    rec.add_argument("--seed", required=True, type=int)
    rec.add_argument("--finetune-audit", required=True, help="grounding-audit JSON of the fine-tuned model")
    rec.add_argument("--stage2-audit", default=None, help="grounding-audit JSON of the stage-2 model")
    rec.add_argument("--seconds", nargs="*", default=[], metavar="STEP=S")
    rec.add_argument("--setting", nargs="*", default=[], metavar="KEY=VALUE")
    summ = sub.add_parser("summarize", help="table.md, cells.csv and figure.png from the cell files",
                          formatter_class=HelpFormatter)
    summ.add_argument("--cells", required=True, help="folder of cell result files")
    summ.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    if args.command == "record":
        seconds = {k: float(v) for k, v in _pairs(args.seconds, "--seconds").items()}
        settings = _pairs(args.setting, "--setting")
        record(args.out, args.method, args.fraction, args.seed, args.finetune_audit, args.stage2_audit, seconds,
               settings)
        # the audits' entries name their own cards (the commit, model and decoding settings they ran with)
        card.write(args.out, {
            "method": args.method,
            "fraction": args.fraction,
            "finetune_audit": file_entry(args.finetune_audit),
            "stage2_audit": file_entry(args.stage2_audit) if args.stage2_audit else None,
            "seconds": seconds,
            "settings": settings,
        }, seed=args.seed)
        print(f"wrote {args.out} and its reproducibility card")
    else:
        paths = summarize(args.cells, args.out)
        print(Path(paths["table"]).read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
