"""`exgra-med data-efficiency record|summarize`: cell files, the mean +- std table, the CSV and the figure."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from exgra_med.cli import main as cli
from exgra_med.eval.study import load_cells, record, summarize, table


def _audit(path, real, blank, shuffled):
    def row(avg_closed_open):
        closed, recall = avg_closed_open
        return {"average": (closed + recall) / 2, "closed_accuracy": closed, "recall": recall}

    path.write_text(
        json.dumps(
            {
                "questions": 10,
                "closed": 5,
                "seed": 0,
                "rows": {
                    "real images": row(real),
                    "blank images": row(blank),
                    "shuffled images": row(shuffled),
                    "majority answer": row((50.0, 10.0)),
                    "question prior": row((60.0, 20.0)),
                },
                "answers_changed_vs_real": {"blank images": 40.0, "shuffled images": 30.0},
                "answers": {},
            }
        )
    )
    return path


@pytest.fixture
def cells(tmp_path):
    folder = tmp_path / "cells"
    scores = {
        ("exgra_med", 10): [(90.0, 80.0), (94.0, 84.0)],
        ("llava_med", 10): [(70.0, 40.0), (74.0, 44.0)],
        ("exgra_med", 100): [(99.0, 95.0), (97.0, 93.0)],
        ("llava_med", 100): [(98.0, 90.0), (96.0, 92.0)],
    }
    for (method, fraction), per_seed in scores.items():
        for seed, real in enumerate(per_seed):
            ft = _audit(tmp_path / f"ft_{method}_{fraction}_{seed}.json", real, (60.0, 10.0), (55.0, 12.0))
            s2 = _audit(tmp_path / f"s2_{method}_{fraction}_{seed}.json", (50.0, 5.0), (50.0, 5.0), (50.0, 5.0))
            record(
                folder / f"{method}_f{fraction}_s{seed}.json",
                method,
                fraction,
                seed,
                ft,
                s2,
                {"stage1": 10, "stage2": 20, "finetune": 30, "eval": 5},
                {"model": "tiny"},
            )
    return folder


def test_record_holds_the_audits_settings_and_versions(cells):
    cell = json.loads((cells / "exgra_med_f10_s1.json").read_text())
    assert (cell["method"], cell["fraction"], cell["seed"]) == ("exgra_med", 10, 1)
    assert cell["finetune"]["rows"]["real images"]["closed_accuracy"] == 94.0
    assert cell["stage2"]["rows"]["blank images"]["recall"] == 5.0
    assert cell["seconds"]["finetune"] == 30 and cell["settings"]["model"] == "tiny"
    assert "torch" in cell["versions"] and "transformers" in cell["versions"]
    assert "answers" not in cell["finetune"]  # the per-question answers stay in the audit files


def test_table_has_mean_and_std_over_seeds_per_answer_type(cells):
    text = table(load_cells(cells))
    # ExGra-Med at 10%: closed 90 / 94 -> 92.00 +- 2.83, open 80 / 84 -> 82.00 +- 2.83, overall 85 / 89 -> 87.00
    sd = statistics.stdev([90.0, 94.0])
    assert f"| ExGra-Med | 10% | 2 | real | 87.00 ± {sd:.2f} | 92.00 ± {sd:.2f} | 82.00 ± {sd:.2f} |" in text
    assert "| LLaVA-Med (alignment off) | 100% | 2 | blank | 35.00 ± 0.00 | 60.00 ± 0.00 | 10.00 ± 0.00 |" in text
    assert "| question prior | 40.00 | 60.00 | 20.00 |" in text
    assert "Before fine-tuning" in text and "Wall time per cell" in text
    # Rows ordered by fraction, the baseline method first.
    assert text.index("| LLaVA-Med (alignment off) | 10%") < text.index("| ExGra-Med | 10%") < text.index("| 100%")


def test_summarize_writes_table_csv_and_figure(cells, tmp_path, capsys):
    out = tmp_path / "results"
    assert cli(["data-efficiency", "summarize", "--cells", str(cells), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "cells.csv").open()))
    assert len(rows) == 8 * 3  # cells x (overall, closed, open)
    closed = [
        float(r["score"])
        for r in rows
        if r["method"] == "ExGra-Med" and r["fraction"] == "10.0" and r["dataset"] == "closed"
    ]
    assert sorted(closed) == [90.0, 94.0]
    png = (out / "figure.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "ExGra-Med" in (out / "table.md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_summarize_without_cells_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(["data-efficiency", "summarize", "--cells", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no cell result files" in err and "Traceback" not in err


def test_summarize_function_returns_paths(cells, tmp_path):
    paths = summarize(cells, tmp_path / "r")
    assert all(p.is_file() for p in paths.values())
