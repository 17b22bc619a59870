"""`python -m benchmarks --quick` runs every benchmark and writes a report (the speed itself is not asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmarks_write_a_report(tmp_path):
    out = tmp_path / "RESULTS.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("## Targets", "## Alignment loss and solver", "## Stage-2 training step", "## Answer generation",
                    "## Padding-free training batches"):
        assert heading in text
    verdicts = re.findall(r"\| (met|NOT met) \|", text)
    assert len(verdicts) == 6
    ms = float(re.search(r"B = 16 \(1 thread\) \| <= 50 ms \| ([0-9.]+) ms", text).group(1))
    assert ms > 0
    assert float(re.search(r"B = 64 \(1 thread\) \| <= 100 ms \| ([0-9.]+) ms", text).group(1)) > 0
    # both solver arrangements ran on the same nodes and gave the same loss at every step
    assert re.search(r"\| 64 \| sparse over dense: [0-9.]+x \([0-9.]+x\) \| True \|", text)
    assert "| True |" in text  # batched generation gave the batch-1 answers
    assert "## GPU: 7B-shaped model, bf16" in text  # the recorded GPU runs are carried into every report


@pytest.mark.slow
def test_gpu_benchmark_code_paths_run_on_cpu(tmp_path):
    """`bench_gpu --quick --device cpu` runs the GPU script's step, sweep, generation and solver code on a tiny model
    (no figures): a broken GPU benchmark is caught here, not on a lent GPU."""
    out = tmp_path / "gpu.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--quick", "--device", "cpu", "--only",
                           "align,sweep", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    kinds = [r["benchmark"] for r in rows]
    assert kinds.count("gpu_align") == 2 and kinds.count("gpu_sweep") == 2
    for r in rows:
        if r["benchmark"] == "gpu_sweep":
            # extra LLM tokens make the aligned step cost more model FLOPs, growing with the text length
            assert r["flops_ratio"] > 1 and r["exgra_med_s"] > 0
    sweep = [r["flops_ratio"] for r in rows if r["benchmark"] == "gpu_sweep"]
    assert sweep[1] > sweep[0]
    assert "| 16 | 4096 | cpu |" in proc.stdout


def test_align_benchmark_times_both_solver_arrangements():
    from benchmarks import bench_align

    rows = bench_align.time_steps(12, repeats=2, dim=16)
    speed = [r for r in rows if r["kind"] == "speed"]
    assert [r["pairs"] for r in speed] == ["dense", "sparse"]
    assert all(r["ms_median"] > 0 and r["cpu_ms_median"] >= 0 and 0 <= r["hamming"] <= 2 for r in speed)
    assert speed[0]["hamming"] == speed[1]["hamming"]
    (ratio,) = [r for r in rows if r["kind"] == "speedup"]
    assert ratio["same_losses"] is True and ratio["wall_ratio"] > 0
    assert bench_align.step_ms(rows, 12) == speed[1]["ms_median"]
    table = bench_align._table([r | {"threads": 1} for r in rows])
    assert "| 12 | 16 | 1 | sparse |" in table and "| 12 | sparse over dense:" in table


def test_recorded_gpu_runs_render():
    from benchmarks.__main__ import gpu_section

    text = gpu_section()
    assert "MFU" in text and "| lm_only | sdpa | 16 x 514 |" in text
    assert "| 514 | 32 + 64 |" in text  # the sweep over alignment text lengths


def test_yes_no_probe_answers_follow_the_fact_and_the_negation():
    import random

    from benchmarks.probe_yes_no import closed_questions, sample

    questions = closed_questions()
    assert any(" not " in q for q in questions) and all(q.endswith('"No").') for q in questions)
    rng = random.Random(0)
    samples = [sample(rng, questions) for _ in range(400)]
    for question, fact, yes in samples:
        asked = [w for w in fact.split() if w in question.lower()]
        negated = " not " in question or " no " in question
        assert yes == ((len(asked) == len(fact.split())) != negated), (question, fact, yes)
    assert 0.4 < sum(yes for _, _, yes in samples) / len(samples) < 0.6  # balanced: no answer prior


def test_yes_no_probe_trains_and_reports(capsys):
    from benchmarks.probe_yes_no import main

    assert main(["--steps", "2", "--every", "1", "--batch", "4", "--image-tokens", "3", "--hidden", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "3 image tokens" in lines[0] and len(lines) == 4
    step, stand_ins, loss, accuracy, _ = lines[-1].split()
    assert step == "2" and stand_ins == "3" and 0 < float(loss) < 5 and 0 <= float(accuracy) <= 100


def test_yes_no_probe_curriculum_grows_the_image_stand_ins(capsys):
    from benchmarks.probe_yes_no import main

    args = ["--steps", "5", "--every", "1", "--batch", "2", "--image-tokens", "8", "--hidden", "32",
            "--start-tokens", "0", "--hold", "1", "--ramp", "2"]
    assert main(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("1", "0"), ("2", "4"), ("3", "8"), ("4", "8"), ("5", "8")]
    with pytest.raises(SystemExit):
        main(["--image-tokens", "4", "--start-tokens", "5"])


def test_yes_no_bound_follows_the_comparison_only_where_it_beats_the_question_prior():
    from benchmarks.yes_no_bound import expected_closed_accuracies
    from exgra_med.data.prepare.vqa import make_vqa_record

    def records(question: str, answers: list[str], start: int) -> list[dict]:
        return [make_vqa_record(start + i, "x.png", question, a, "CLOSED") for i, a in enumerate(answers)]

    # "red" has a prior share of 7/8 ("no"), "not red" of 3/4 ("yes"); an open record is left out.
    train = records("Is there a red shape?", ["no"] * 7 + ["yes"], 0) + records("Is there not a red shape?",
                                                                              ["yes"] * 3 + ["no"], 10)
    test = (records("Is there a red shape?", ["no", "no"], 20) + records("Is there not a red shape?", ["yes", "no"], 30)
            + [make_vqa_record(40, "x.png", "What color is the shape?", "red", "OPEN")])
    prior, only_not_red, both, perfect = expected_closed_accuracies(train, test, [0.5, 0.8, 0.9, 1.0])
    assert prior == 75.0  # the prior: 3 of 4 right
    assert abs(only_not_red - 90.0) < 1e-9  # (2 + 0.8 + 0.8) / 4: only "not red" follows
    assert abs(both - 90.0) < 1e-9  # both follow the comparison
    assert perfect == 100.0
    with pytest.raises(ValueError, match="reliability"):
        expected_closed_accuracies(train, test, [0.9, 0.4])
    with pytest.raises(ValueError, match="no CLOSED"):
        expected_closed_accuracies(train, test[-1:], [0.9])


def test_yes_no_bound_cli_prints_the_table(tmp_path, capsys):
    import json

    from benchmarks.yes_no_bound import main
    from exgra_med.data.prepare.vqa import make_vqa_record

    answers = ["no", "no", "yes"]
    train = [make_vqa_record(i, "x.png", "Is there a red shape?", a, "CLOSED") for i, a in enumerate(answers)]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(train[:2]))
    assert main(["--train", str(tmp_path / "train.json"), "--test", str(tmp_path / "test.json"),
                 "--reliability", "0.5", "0.9"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 yes/no test questions") and out[-2:] == ["| 50% | 100.0 |", "| 90% | 90.0 |"]


def test_rationale_answers_name_the_question_word_then_the_image_word():
    from benchmarks.rationale_answers import rationale_answers
    from exgra_med.data.prepare.vqa import make_vqa_record

    records = [
        make_vqa_record(0, "a.png", "What color is the shape?", "blue", "OPEN"),
        make_vqa_record(1, "a.png", "Is there a red shape?", "no", "CLOSED"),
        make_vqa_record(2, "a.png", "Is there not a blue shape?", "no", "CLOSED"),
        make_vqa_record(3, "a.png", "Is there a circle?", "yes", "CLOSED"),  # tells the shape of a.png
        make_vqa_record(4, "b.png", "Is there not a triangle?", "yes", "CLOSED"),  # b.png: shape unknown
        make_vqa_record(5, "a.png", "Does the image contain a blue circle?", "yes", "CLOSED"),  # names two words
    ]
    out, changed = rationale_answers(records)
    answers = [r["conversations"][1]["value"] for r in out]
    assert answers == ["blue", "red , blue , no", "blue , blue , no", "circle , circle , yes", "yes", "yes"]
    assert changed == 3 and records[1]["conversations"][1]["value"] == "no"  # the input is not modified
    assert all("yes" not in a.rsplit(",", 1)[0] and "no" not in a.rsplit(",", 1)[0] for a in answers[1:4])


def test_easy_vqa_breakdown_scores_each_question_kind_per_condition(tmp_path, capsys):
    import json

    from benchmarks.easy_vqa_breakdown import breakdown, comparisons, main, question_kind
    from exgra_med.data.prepare.vqa import CLOSED_YES_NO_SUFFIX, make_vqa_record

    questions = [
        make_vqa_record(0, "a.png", "What color is the shape?", "blue", "OPEN"),
        make_vqa_record(1, "a.png", "What shape is present?", "circle", "OPEN"),
        make_vqa_record(2, "a.png", "What shape is in the image?", "circle", "OPEN"),
        make_vqa_record(3, "a.png", "Is there a red shape?" + CLOSED_YES_NO_SUFFIX, "no", "CLOSED"),
        make_vqa_record(4, "a.png", "Is there not a blue shape?" + CLOSED_YES_NO_SUFFIX, "no", "CLOSED"),
        make_vqa_record(5, "a.png", "Does the image contain a circle?" + CLOSED_YES_NO_SUFFIX, "yes", "CLOSED"),
        make_vqa_record(6, "a.png", "Is there no triangle?" + CLOSED_YES_NO_SUFFIX, "yes", "CLOSED"),
    ]
    assert [question_kind(q) for q in questions] == [
        "open: colour", "open: shape", "open: shape", "yes/no: colour, truth no", "yes/no: colour, negated, truth no",
        "yes/no: shape, truth yes", "yes/no: shape, negated, truth yes",
    ]
    real = {"0": "blue", "1": "circle", "2": "triangle", "3": "no", "4": "no", "5": "yes", "6": "no"}
    blank = {"0": "red", "1": "circle", "2": "circle", "3": "yes", "4": "yes", "5": "yes", "6": "yes"}
    table = breakdown(questions, {"real": real, "blank": blank})
    assert table["open: colour"] == {"real": (1, 100.0), "blank": (1, 0.0)}
    assert table["open: shape"] == {"real": (2, 50.0), "blank": (2, 100.0)}
    assert table["yes/no: colour, truth no"]["real"] == (1, 100.0)
    assert table["yes/no: shape, negated, truth yes"] == {"real": (1, 0.0), "blank": (1, 100.0)}

    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "audit.json").write_text(json.dumps({"answers": {"real images": real, "blank images": blank}}))
    assert main(["--questions", str(tmp_path / "q.json"), "--audit", str(tmp_path / "audit.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| question kind | questions | real images | blank images |"
    assert out[3] == "| open: shape | 2 | 50.0 | 100.0 |" and len(out) == 2 + 6
    # rationale answers: the comparison word is checked against the two words before it, per condition
    rationale = dict(real, **{"3": "red blue different present no", "4": "blue blue different absent no",
                              "5": "circle circle same present yes", "6": "triangle circle"})
    assert comparisons(questions, {"real": real, "rationale": rationale}) == {"rationale": (2, 3)}
    (tmp_path / "audit.json").write_text(json.dumps({"answers": {"real images": rationale}}))
    assert main(["--questions", str(tmp_path / "q.json"), "--audit", str(tmp_path / "audit.json")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "real images: the comparison agrees with the asked and seen words in 2 of the 3 yes/no answers written as "
        "a rationale")
    del real["6"]
    with pytest.raises(ValueError, match=r"real: no answer for question\(s\) \['6'\]"):
        breakdown(questions, {"real": real})
