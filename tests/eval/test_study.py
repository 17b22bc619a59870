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


def _protocol2_audit(path, real, blank, answers, follows=80.0):
    """An audit with per-question answers (ids 0-3 closed, 4-7 open) and counterfactual rows."""
    audit = json.loads(_audit(path, real, blank, blank).read_text())
    audit["answers"] = {"real images": answers}
    audit["counterfactual"] = {
        "rows": {kind: {"new": {"percent": follows}} for kind in ("colour, open", "colour, yes/no", "shape, open",
                                                                  "shape, yes/no")},
        "pairs": {kind: {"both right": {"percent": follows / 2}} for kind in ("colour, yes/no", "shape, yes/no")},
        "answers": {"counterfactual images": {}},
    }
    path.write_text(json.dumps(audit))
    return path


QUESTIONS = [
    {"id": i, "answer_type": "CLOSED" if i < 4 else "OPEN",
     "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "yes" if i < 4 else "red circle"}]}
    for i in range(8)
]


def _answers(closed_right, open_words):
    """closed_right of the 4 yes/no questions right; each open answer names `open_words` of the two words."""
    out = {str(i): "yes" if i < closed_right else "no" for i in range(4)}
    out.update({str(i): " ".join(["red", "circle"][:open_words]) or "blue" for i in range(4, 8)})
    return out


@pytest.fixture
def protocol2(tmp_path):
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(QUESTIONS))
    folder = tmp_path / "cells2"
    # per seed: (closed right, open words) of the stage-2 model and at fine-tuning steps 10 and 20 (the final model)
    plan = {"llava_med": [((2, 0), (2, 1), (3, 1)), ((1, 0), (3, 1), (3, 1))],
            "exgra_med": [((2, 1), (3, 2), (4, 2)), ((2, 1), (4, 1), (4, 2))],
            "exgra_med_a0.25": [((2, 1), (3, 1), (3, 2)), ((2, 1), (3, 1), (3, 2))]}
    for method, seeds in plan.items():
        for seed, points in enumerate(seeds):
            paths = []
            for step, (closed, words) in zip((0, 10, 20), points):
                answers = _answers(closed, words)
                real = (100.0 * closed / 4, 50.0 * words)
                paths.append(_protocol2_audit(tmp_path / f"{method}_{seed}_{step}.json", real, (50.0, 0.0), answers))
            record(folder / f"{method}_f10_s{seed}.json", method, 10, seed, paths[2], paths[0], {"stage2": 1.0},
                   {"stage2_steps": "7"}, curve={10: paths[1], 20: paths[2]}, questions=questions)
    return folder


def test_protocol2_cells_hold_the_curve_and_per_question_scores(protocol2):
    cell = json.loads((protocol2 / "exgra_med_f10_s1.json").read_text())
    assert sorted(cell["curve"]) == ["10", "20"]
    assert cell["curve"]["10"]["rows"]["real images"]["closed_accuracy"] == 100
    assert cell["finetune"]["per_question"]["closed"] == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 1.0}
    assert cell["stage2"]["per_question"]["open"] == {"4": 0.5, "5": 0.5, "6": 0.5, "7": 0.5}
    assert "answers" not in cell["finetune"]["counterfactual"]
    with pytest.raises(ValueError, match="unknown method 'exgra'"):
        record(protocol2 / "x.json", "exgra", 10, 0, protocol2 / "x", None, {}, {})


def test_protocol2_tables(protocol2):
    text = table(load_cells(protocol2))
    assert text.startswith("All 6 cells ran on commit unknown (no card).")
    # learning curve, overall: ExGra-Med seed 0 (50+50)/2 -> 50, (75+100)/2 -> 87.5, 100; seed 1: 50, 75, 100
    assert "| ExGra-Med | 10% | 2 | 50.00 ± 0.00 | 81.25 ± 8.84 | 100.00 ± 0.00 |" in text
    assert "| ExGra-Med, alpha 0.25 | 10% | 2 |" in text
    # steps to reach an overall score (mean over seeds): ExGra-Med 81.25 at 10 (>= 60, 70, 80), 100 at 20 (>= 90)
    assert "| ExGra-Med | 10% | 10 | 10 | 10 | 20 | 100.00 (20) |" in text
    # LLaVA-Med: stage 2 (37.5+0 / 25+0)/2 = 18.75 / 12.5; final (75+50)/2 = 62.5 both seeds: only >= 60, at 10 for
    # seed 1 (62.5) but not seed 0 (50): mean 56.25 at 10, 62.5 at 20
    assert "| LLaVA-Med (alignment off) | 10% | 20 | - | - | - | 62.50 (20) |" in text
    # paired difference of the final models, ExGra-Med minus LLaVA-Med: closed 100-75 = +25 both seeds (one
    # question of four: resampled questions give 0-75), open 100-50 on every question
    assert "| ExGra-Med minus LLaVA-Med (alignment off) | 10% | fine-tuned | 2 | +37.50 [+25.00, +62.50] | " \
           "+25.00 [+0.00, +75.00] | +50.00 [+50.00, +50.00] |" in text
    assert "| ExGra-Med, alpha 0.25 minus LLaVA-Med (alignment off) | 10% | fine-tuned | 2 |" in text
    assert "| ExGra-Med | 10% | 2 | 80.00 ± 0.00 | 80.00 ± 0.00 | 80.00 ± 0.00 | 80.00 ± 0.00 | 40.00 ± 0.00 | " \
           "40.00 ± 0.00 |" in text  # counterfactual follow-new and pairs
    assert text.count("stage2_steps") == 1 and "| ExGra-Med | 10% | 0 | 1.0 | 7 |" in text


def test_paired_bootstrap_interval_covers_the_difference_and_widens_with_spread(protocol2):
    from exgra_med.eval.study import paired_difference

    cells = load_cells(protocol2)
    a = [c for c in cells if c["method"] == "exgra_med"]
    b = [c for c in cells if c["method"] == "llava_med"]
    stage2 = paired_difference(a, b, "stage2")
    # closed: seed 0 2-2 = 0, seed 1 2-1 = +1 of 4 -> +12.5; open +50 both seeds
    assert stage2["difference"]["closed"] == pytest.approx(12.5) and stage2["seeds"] == [0, 1]
    low, high = stage2["ci95"]["closed"]
    assert low <= 12.5 <= high and high - low > 10
    assert stage2["ci95"]["open"] == pytest.approx((50.0, 50.0))
    assert paired_difference(a, b, "stage2") == stage2  # seeded
    assert paired_difference(a, [], "stage2") is None


def test_mixed_commits_are_named(cells):
    from exgra_med.eval.study import commits_line

    loaded = load_cells(cells)
    loaded[0]["commit"] = "abc"
    assert commits_line(loaded).startswith(
        "The cells ran on 2 code versions: abc (1 cells), unknown (no card) (7 cells)")


def test_summarize_draws_the_learning_curves(protocol2, tmp_path):
    paths = summarize(protocol2, tmp_path / "r")
    rows = list(csv.DictReader(paths["curve_csv"].open()))
    assert len(rows) == 6 * 3 * 3  # cells x (stage 2, 10, 20) x (overall, closed, open)
    assert {r["step"] for r in rows} == {"0", "10", "20"}
    assert paths["curve_figure"].read_bytes()[:4] == b"\x89PNG"


def test_matched_steps_scale_by_the_runtime_ratio(tmp_path, capsys):
    for name, steps, runtime in (("llava", 100, 40.0), ("exgra", 100, 66.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps(
            {"global_step": steps, "log_history": [{"loss": 1.0}, {"train_runtime": runtime}]}))
    argv = ["data-efficiency", "matched-steps", "--baseline", str(tmp_path / "llava"),
            "--target", str(tmp_path / "exgra")]
    assert cli(argv) == 0 and capsys.readouterr().out.strip() == "165"
    argv[-1] = str(tmp_path / "missing")
    assert cli(argv) == 2 and "trainer_state.json not found: the run has not finished" in capsys.readouterr().err


def test_export_makes_the_study_folder_relative(cells, tmp_path, capsys):
    card = cells / "exgra_med_f10_s0.card.json"
    card.write_text(json.dumps({"cwd": str(tmp_path), "score_file": str(cells / "exgra_med_f10_s0.json"),
                                "code": {"commit": "abc"}, "other": ["/elsewhere/x"]}))
    out = tmp_path / "published"
    assert cli(["data-efficiency", "export", "--cells", str(cells), "--out", str(out), "--root", str(tmp_path)]) == 0
    assert "wrote 9 files" in capsys.readouterr().out
    assert json.loads((out / "exgra_med_f10_s0.card.json").read_text()) == {
        "cwd": ".", "score_file": "cells/exgra_med_f10_s0.json", "code": {"commit": "abc"}, "other": ["/elsewhere/x"]}
    assert (out / "llava_med_f10_s0.json").read_text() == (cells / "llava_med_f10_s0.json").read_text()
    assert [c["commit"] for c in load_cells(out) if (c["method"], c["fraction"], c["seed"]) == ("exgra_med", 10, 0)
            ] == ["abc"]
