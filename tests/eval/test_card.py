"""Reproducibility cards beside the score files of `score`, `grounding-audit` and `data-efficiency record`: what they
hold, the commit of a checkout, the hardware without importing torch, and a rerun from a card's command line."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import torch

from exgra_med import __version__
from exgra_med.cli import main as cli_main
from exgra_med.eval import card as card_module
from exgra_med.eval.card import answers_generation, card_path, code_revision, hardware, is_card
from exgra_med.eval.grounding import main as audit_main
from exgra_med.eval.metrics import main as score_main
from exgra_med.eval.study import load_cells
from exgra_med.eval.study import main as study_main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vqa_scoring"
EXGRA_MED = str(Path(sys.executable).parent / "exgra-med")  # the installed console script


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_common(card: dict, command: str) -> None:
    """The parts every card holds: command line, code, versions, hardware, wall time."""
    assert card["command"].startswith(f"exgra-med {command} ")
    assert card["cwd"] and Path(card["cwd"]).is_dir()
    assert card["code"]["version"] == __version__
    if "commit" in card["code"]:  # run from a git checkout (an editable install)
        assert card["code"]["commit"] == _git(card_module.SOURCE_TREE, "rev-parse", "HEAD")
    assert {"python", "exgra-med", "torch", "transformers", "nltk"} <= set(card["versions"])
    hw = card["hardware"]
    assert hw["cpu"] and hw["cpu_cores"] >= 1 and 1 <= hw["cpu_cores_usable"] <= hw["cpu_cores"]
    time = card["time"]
    assert time["seconds"] > 0
    start, end = (datetime.fromisoformat(time[k].replace("Z", "+00:00")) for k in ("start_utc", "end_utc"))
    assert start <= end


def test_the_card_sits_beside_its_score_file():
    assert card_path("runs/eval/scores.json") == Path("runs/eval/scores.card.json")
    assert card_path("runs/eval/scores") == Path("runs/eval/scores.card.json")
    assert card_path("audit.out") == Path("audit.out.card.json")
    assert is_card("runs/eval/scores.card.json") and not is_card("runs/eval/scores.json")


def _git(repo: Path, *args: str) -> str:
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def test_code_revision_is_the_checkouts_commit_and_whether_tracked_files_changed(tmp_path, monkeypatch):
    repo = tmp_path / "checkout"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "first")
    monkeypatch.setattr(card_module, "SOURCE_TREE", repo.resolve())
    head = _git(repo, "rev-parse", "HEAD")
    assert code_revision() == {"version": __version__, "commit": head, "dirty": False}
    (repo / "notes.txt").write_text("untracked files do not make it dirty\n")
    assert code_revision()["dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    assert code_revision() == {"version": __version__, "commit": head, "dirty": True}
    # A package installed inside a checkout (a virtual environment in the work tree) is not that checkout's code.
    site = repo / ".venv" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(card_module, "SOURCE_TREE", site.resolve())
    assert code_revision() == {"version": __version__}


def test_hardware_looks_up_gpus_only_in_a_command_that_imported_torch(monkeypatch):
    with_torch = hardware()
    expected = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    assert with_torch["gpus"] == expected
    monkeypatch.delitem(sys.modules, "torch")
    without = hardware()
    assert without["gpus"] is None and "without torch" in without["gpus_note"]
    assert "torch" not in sys.modules


def test_answers_generation_is_the_recorded_settings_one_or_all(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "answers.jsonl").read_text().splitlines()]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert answers_generation(path) is None  # the fixture's lines record none
    first, second = {"model": "/m", "seed": 0}, {"model": "/m", "seed": 1}
    path.write_text("".join(json.dumps({**r, "metadata": {"generation": first}}) + "\n" for r in rows))
    assert answers_generation(path) == first
    rows[3]["metadata"] = {"generation": second}
    path.write_text("".join(json.dumps({**r, "metadata": r["metadata"] or {"generation": first}}) + "\n"
                            for r in rows))
    assert answers_generation(path) == [first, second]


def test_score_writes_a_card_and_its_command_line_reruns_to_the_same_scores(tmp_path, monkeypatch):
    generation = {"conv_mode": "simple", "max_new_tokens": 8, "model": "/models/tiny", "seed": 0, "temperature": 0.0}
    pred = tmp_path / "answers.jsonl"
    pred.write_text("".join(json.dumps({**json.loads(line), "metadata": {"generation": generation}}) + "\n"
                            for line in (FIXTURES / "answers.jsonl").read_text().splitlines()))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative --json: the card's folder makes its command line rerunnable
    argv = ["--gt", str(FIXTURES / "test.json"), "--pred", str(pred), "--candidate", str(FIXTURES / "candidate.json"),
            "--json", "scores.json"]
    assert score_main(argv) == 0
    scores = (work / "scores.json").read_bytes()
    card = json.loads((work / "scores.card.json").read_text())
    _check_common(card, "score")
    assert shlex.split(card["command"]) == ["exgra-med", "score", *argv]
    assert Path(card["cwd"]) == work.resolve() and Path(card["score_file"]) == (work / "scores.json").resolve()
    settings = card["settings"]
    for key, path in (("gt", FIXTURES / "test.json"), ("pred", pred), ("candidate", FIXTURES / "candidate.json")):
        assert settings[key]["path"] == str(path.resolve()) and settings[key]["sha256"] == _sha256(path)
    assert settings["pred_generation"] == generation
    assert card["seed"] is None  # scoring has none

    # Rerun from the card alone, through the console script as a user would: the same scores, and a light command
    # still (writing the card imports no torch).
    (work / "scores.json").unlink()
    command = shlex.split(card["command"])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPROFILEIMPORTTIME="1")
    proc = subprocess.run([EXGRA_MED, *command[1:]], cwd=card["cwd"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (work / "scores.json").read_bytes() == scores
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "exgra_med.eval.card" in imported and "torch" not in imported
    rerun = json.loads((work / "scores.card.json").read_text())
    assert rerun["command"] == card["command"] and rerun["hardware"]["gpus"] is None


def test_grounding_audit_card_holds_the_answers_generation_settings_and_seed(tiny_model_dir, easy_vqa_dir,
                                                                            tmp_path):
    questions = json.loads((easy_vqa_dir / "test.json").read_text())[:4]
    qfile = tmp_path / "questions.json"
    qfile.write_text(json.dumps(questions))
    answers, out = tmp_path / "answers.jsonl", tmp_path / "audit.json"
    argv = ["--model", str(tiny_model_dir), "--question-file", str(qfile), "--image-folder",
            str(easy_vqa_dir / "images"), "--candidate", str(easy_vqa_dir / "candidate.json"), "--max-new-tokens", "3",
            "--seed", "3", "--batch-size", "4", "--answers-file", str(answers), "--out", str(out), "--quiet"]
    assert audit_main(argv) == 0
    card = json.loads(card_path(out).read_text())
    _check_common(card, "grounding-audit")
    assert shlex.split(card["command"])[2:] == argv
    assert card["seed"] == 3 and isinstance(card["hardware"]["gpus"], list)  # torch is imported: GPUs looked up
    settings = card["settings"]
    # The generation settings are those the answers file records for its lines (`provenance`, one definition).
    assert settings["generation"] == answers_generation(answers)
    generation = settings["generation"]
    assert generation["model"] == str(tiny_model_dir.resolve()) and generation["weights"]
    assert (generation["max_new_tokens"], generation["seed"], generation["conv_mode"]) == (3, 3, "simple")
    assert settings["question_file"]["sha256"] == _sha256(qfile) and settings["answers_file"]["sha256"] == \
        _sha256(answers)
    assert settings["image_folder"] == str((easy_vqa_dir / "images").resolve())
    assert (settings["batch_size"], settings["counterfactual"], settings["train"]) == (4, "auto", None)
    assert settings["placement"] == {"device": "auto", "attn_implementation": "sdpa"}

    # Rerun from the card's command line, through the dispatcher: the same audit.
    audit = out.read_bytes()
    out.unlink()
    assert cli_main(shlex.split(card["command"])[1:]) == 0
    assert out.read_bytes() == audit


def _audit_file(path: Path) -> Path:
    row = {"average": 50.0, "closed_accuracy": 60.0, "recall": 40.0}
    path.write_text(json.dumps({"questions": 4, "closed": 2, "seed": 0, "answers": {},
                                "rows": {"real images": row, "blank images": row, "shuffled images": row}}))
    return path


def test_study_cell_card_names_the_audits_cards_and_summarize_skips_it(tmp_path):
    finetune, stage2 = _audit_file(tmp_path / "audit_finetune.json"), _audit_file(tmp_path / "audit_stage2.json")
    card_path(finetune).write_text(json.dumps({"code": {"commit": "abc"}}))  # the audit's own card
    out = tmp_path / "cells" / "exgra_med_f10_s2.json"
    argv = ["record", "--out", str(out), "--method", "exgra_med", "--fraction", "10", "--seed", "2",
            "--finetune-audit", str(finetune), "--stage2-audit", str(stage2), "--seconds", "stage2=12.5",
            "--setting", "model=tiny", "stage2_args=--max_steps 40"]
    assert study_main(argv) == 0
    card = json.loads(card_path(out).read_text())
    _check_common(card, "data-efficiency")
    assert shlex.split(card["command"])[2:] == argv
    assert card["seed"] == 2
    settings = card["settings"]
    assert (settings["method"], settings["fraction"], settings["seconds"]) == ("exgra_med", 10.0, {"stage2": 12.5})
    assert settings["settings"] == {"model": "tiny", "stage2_args": "--max_steps 40"}
    assert settings["finetune_audit"]["card"] == str(card_path(finetune).resolve())
    assert settings["finetune_audit"]["sha256"] == _sha256(finetune) and "card" not in settings["stage2_audit"]
    assert [cell["seed"] for cell in load_cells(out.parent)] == [2]  # the card is not read as a cell


def test_score_without_json_writes_no_card(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert score_main(["--gt", str(FIXTURES / "test.json"), "--pred", str(FIXTURES / "answers.jsonl"),
                       "--candidate", str(FIXTURES / "candidate.json")]) == 0
    assert list(tmp_path.iterdir()) == [] and not list(FIXTURES.glob("*.card.json"))
