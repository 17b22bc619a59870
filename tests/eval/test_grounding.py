"""The grounding audit on a model that provably ignores images and on one whose answers depend on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from exgra_med.eval.counterfactual import counterfactual_questions, known_truth, outcome, probe
from exgra_med.eval.grounding import CONDITIONS, audit, blank_images, changed_fraction, main, shuffled_images
from exgra_med.model.auto import backend_for
from exgra_med.model.loading import load_pretrained


@pytest.fixture(scope="module")
def questions(easy_vqa_dir) -> list[dict]:
    return json.loads((easy_vqa_dir / "test.json").read_text())[:24]


def _model(tiny_model_dir, projector_scale: float):
    """The tiny model with its projector scaled: 0 makes every image the same zero features (the answers cannot
    depend on the image); a large factor makes the image features dominate the prompt."""
    model, tokenizer, processor = load_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        for p in model.mm_projector.parameters():
            p.mul_(projector_scale)
    return model, tokenizer, processor


def _run(model, tokenizer, processor, questions, easy_vqa_dir, counterfactual="auto"):
    return audit(backend_for(model, tokenizer, processor), questions,
                 json.loads((easy_vqa_dir / "candidate.json").read_text()),
                 image_folder=easy_vqa_dir / "images", train=json.loads((easy_vqa_dir / "train.json").read_text()),
                 seed=0, batch_size=8, max_new_tokens=3, counterfactual=counterfactual)


def test_shuffle_is_seeded_and_moves_every_image(questions):
    a, b = shuffled_images(questions, 3), shuffled_images(questions, 3)
    assert [r["image"] for r in a] == [r["image"] for r in b]
    assert {r["image"] for r in a} == {r["image"] for r in questions}
    assert all(x["image"] != y["image"] for x, y in zip(a, questions))
    assert [r["image"] for r in shuffled_images(questions, 4)] != [r["image"] for r in a]


def test_blank_images_keep_the_size(questions, easy_vqa_dir, tmp_path):
    blank = blank_images(questions[:3], easy_vqa_dir / "images", tmp_path)
    for original, record in zip(questions[:3], blank):
        image = Image.open(record["image"])
        assert image.size == Image.open(easy_vqa_dir / "images" / original["image"]).size
        assert image.convert("RGB").getextrema() == ((255, 255),) * 3
    assert changed_fraction({"1": "Yes", "2": "red"}, {"1": "yes ", "2": "blue"}) == 50.0


def test_audit_of_a_model_that_ignores_images(tiny_model_dir, easy_vqa_dir, questions, tmp_path):
    result = _run(*_model(tiny_model_dir, 0.0), questions, easy_vqa_dir)
    assert result["answers_changed_vs_real"] == {"blank images": 0.0, "shuffled images": 0.0}
    real = result["rows"]["real images"]
    assert all(result["rows"][name] == real for name in CONDITIONS)
    assert {"majority answer", "question prior"} <= set(result["rows"])
    assert result["multimodal_gain"] == {"average": 0.0, "closed_accuracy": 0.0, "recall": 0.0}

    # Edited images: the same answers as on the real ones, so no answer moves to the new truth; the only answers
    # that "follow" it are those that already gave it on the unedited image.
    controls = result["counterfactual"]
    assert controls["used"] and controls["setting"] == "auto"
    edited = controls["answers"]["counterfactual images"]
    real_answers = result["answers"]["real images"]
    assert edited == real_answers
    questions_by_kind: dict[str, list[dict]] = {}
    for record in questions:
        questions_by_kind.setdefault(probe(record).kind, []).append(record)
    assert set(controls["rows"]) == set(questions_by_kind)
    edited_records = {r["id"]: r["counterfactual"] for r in counterfactual_questions(
        questions, known_truth(questions, easy_vqa_dir / "images")[0], easy_vqa_dir / "images", tmp_path, seed=0)[0]}
    for kind, row in controls["rows"].items():
        assert row["n"] == len(questions_by_kind[kind]) and row["changed"]["count"] == 0
        already = sum(outcome(real_answers[str(r["id"])], kind, edited_records[r["id"]]["old"],
                              edited_records[r["id"]]["new"]) == "new" for r in questions_by_kind[kind])
        assert row["new"]["count"] == already and row["both"]["count"] == 0, (kind, row)


def test_audit_of_a_model_whose_answers_depend_on_the_image(tiny_model_dir, easy_vqa_dir, questions):
    result = _run(*_model(tiny_model_dir, 50.0), questions, easy_vqa_dir)
    changed = result["answers_changed_vs_real"]
    assert changed["blank images"] > 0 and changed["shuffled images"] > 0, changed
    assert result["answers"]["real images"] != result["answers"]["shuffled images"]
    assert sum(row["changed"]["count"] for row in result["counterfactual"]["rows"].values()) > 0


def test_cli_prints_the_table_and_writes_json(tiny_model_dir, easy_vqa_dir, questions, tmp_path, capsys):
    qfile = tmp_path / "questions.json"
    qfile.write_text(json.dumps(questions[:6]))
    out = tmp_path / "audit.json"
    assert main([
        "--model", str(tiny_model_dir), "--question-file", str(qfile), "--image-folder",
        str(easy_vqa_dir / "images"), "--candidate", str(easy_vqa_dir / "candidate.json"), "--train",
        str(easy_vqa_dir / "train.json"), "--out", str(out), "--max-new-tokens", "3", "--quiet",
    ]) == 0
    printed = capsys.readouterr().out
    for row in (*CONDITIONS, "majority answer", "question prior"):
        assert f"| {row} |" in printed
    assert "multi-modal gain (MMStar; real minus blank images, points): overall " in printed
    assert "answer-change share (answers that differ from the real-image answers): blank images " in printed
    saved = json.loads(Path(out).read_text())
    assert saved["questions"] == 6 and set(saved["answers"]) == set(CONDITIONS)
    controls = saved["counterfactual"]
    assert controls["setting"] == "auto" and controls["used"] and sum(r["n"] for r in controls["rows"].values()) == 6
    assert "counterfactual controls (" in printed
    for kind, row in controls["rows"].items():
        low, high = row["new"]["ci95"]
        assert 0.0 <= low <= row["new"]["percent"] <= high <= 100.0
        shown = f"{row['new']['percent']:.1f} [{low:.1f}-{high:.1f}]"
        assert f"| {kind} | {row['edit']} | {row['n']} | {shown} |" in printed
    for kind, row in controls["pairs"].items():
        assert f"| {kind} | {row['n']} | " in printed


def test_without_known_truth_the_audit_says_so_and_on_is_refused(tiny_model_dir, easy_vqa_dir, questions, tmp_path,
                                                                  monkeypatch, capsys):
    from exgra_med.errors import UserError
    from exgra_med.eval import generate

    unknown = [*questions[:2], {**questions[2], "id": "other-1", "answer_type": "OPEN",
                                "conversations": [questions[2]["conversations"][0],
                                                  {"from": "gpt", "value": "pneumonia"}]}]
    qfile = tmp_path / "questions.json"
    qfile.write_text(json.dumps(unknown))
    argv = ["--model", str(tiny_model_dir), "--question-file", str(qfile), "--image-folder",
            str(easy_vqa_dir / "images"), "--candidate", str(easy_vqa_dir / "candidate.json"), "--max-new-tokens", "2",
            "--quiet", "--out", str(tmp_path / "audit.json")]
    assert main(argv) == 0
    assert ("counterfactual controls: none (question 'other-1' asks about no known colour or shape, so the truth of "
            "its image is unknown); blank, shuffled and prior rows only") in capsys.readouterr().out
    saved = json.loads((tmp_path / "audit.json").read_text())["counterfactual"]
    assert saved["setting"] == "auto" and not saved["used"] and "rows" not in saved
    monkeypatch.setattr(generate, "load_backend", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=r"--counterfactual on needs the truth of the images: question 'other-1'"):
        main([*argv, "--counterfactual", "on"])



def test_cli_shares_the_real_image_answers_with_generate_vqa(tiny_model_dir, easy_vqa_dir, questions, tmp_path):
    from exgra_med.errors import UserError
    from exgra_med.eval import generate

    qfile, half = tmp_path / "questions.json", tmp_path / "half.json"
    qfile.write_text(json.dumps(questions[:6]))
    half.write_text(json.dumps(questions[:3]))
    model_args = ["--model", str(tiny_model_dir), "--image-folder", str(easy_vqa_dir / "images"), "--quiet"]
    common = [*model_args, "--max-new-tokens", "3"]
    full, partial = tmp_path / "full.jsonl", tmp_path / "partial.jsonl"
    assert generate.main([*common, "--question-file", str(qfile), "--answers-file", str(full)]) == 0
    assert generate.main([*common, "--question-file", str(half), "--answers-file", str(partial)]) == 0
    lines = [json.loads(line) for line in full.read_text().splitlines()]
    expected = {str(r["question_id"]): r["text"] for r in lines}
    # A marked answer proves the audit reads the file instead of answering the real images again.
    lines[0]["text"] = "MARKED"
    full.write_text("".join(json.dumps(r) + "\n" for r in lines))
    questions_args = ["--question-file", str(qfile), "--candidate", str(easy_vqa_dir / "candidate.json")]
    audit_args = [*common, *questions_args]
    out = tmp_path / "audit.json"
    assert main([*audit_args, "--answers-file", str(full), "--out", str(out)]) == 0
    real = json.loads(out.read_text())["answers"]["real images"]
    assert real == {**expected, str(lines[0]["question_id"]): "MARKED"}
    assert len(full.read_text().splitlines()) == 6

    # Three answers present: the other three are generated and appended in generate-vqa's format.
    assert main([*audit_args, "--answers-file", str(partial), "--out", str(out)]) == 0
    appended = [json.loads(line) for line in partial.read_text().splitlines()]
    assert len(appended) == 6 and {str(r["question_id"]): r["text"] for r in appended} == expected
    assert appended[-1]["metadata"] == lines[0]["metadata"]
    assert json.loads(out.read_text())["answers"]["real images"] == expected

    with pytest.raises(UserError, match=r"full\.jsonl: holds 6 answers .*max_new_tokens: 3 there, 4 now"):
        main([*model_args, "--max-new-tokens", "4", *questions_args, "--answers-file", str(full)])


@pytest.mark.slow
def test_eval_vqa_script_runs_the_audit(tiny_model_dir, easy_vqa_dir, questions, tmp_path):
    import os
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    (data / "test.json").write_text(json.dumps(questions[:6]))
    (data / "candidate.json").write_text((easy_vqa_dir / "candidate.json").read_text())
    (data / "images").symlink_to(easy_vqa_dir / "images")
    out = tmp_path / "eval"
    repo = Path(__file__).resolve().parents[2]
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{os.environ['PATH']}",
               MODEL_PATH=str(tiny_model_dir), DATA_DIR=str(data), OUT_DIR=str(out), NUM_CHUNKS="1",
               TRAIN_FILE=str(easy_vqa_dir / "train.json"))
    proc = subprocess.run(["bash", str(repo / "scripts" / "eval_vqa.sh"), "--max-new-tokens", "3"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| shuffled images |" in proc.stdout and "| question prior |" in proc.stdout
    audit = json.loads((out / "test_answers_grounding.json").read_text())
    assert audit["questions"] == 6 and (out / "test_answers_scores.json").is_file()
    assert "0 of the 6 real-image answers to generate" in proc.stderr  # generate-vqa-multi's, reused


@pytest.mark.parametrize("command, advice", [
    ("generate-vqa", "Write to another --answers-file, or pass --restart to replace this one."),
    ("grounding-audit", "Write to another --answers-file, or delete this one to generate its answers again."),
])
def test_an_answers_file_of_other_settings_is_refused_with_advice_that_fits_the_command(
        tiny_model_dir, easy_vqa_dir, questions, tmp_path, monkeypatch, capsys, command, advice):
    from exgra_med.cli import main as cli_main
    from exgra_med.eval import generate

    monkeypatch.setattr(generate, "load_backend", lambda *a, **k: pytest.fail("the model was loaded"))
    qfile, answers = tmp_path / "q.json", tmp_path / "answers.jsonl"
    qfile.write_text(json.dumps(questions[:2]))
    answers.write_text(json.dumps({"question_id": questions[0]["id"], "text": "x",
                                   "metadata": {"generation": {"model": "another"}}}) + "\n")
    argv = [command, "--model", str(tiny_model_dir), "--question-file", str(qfile), "--answers-file", str(answers)]
    argv += ["--candidate", str(easy_vqa_dir / "candidate.json")] if command == "grounding-audit" else []
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"exgra-med {command}: error: {answers}: holds 1 answers"), err
    assert err[0].endswith(advice)
