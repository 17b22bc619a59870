"""chatbot-review: judge prompt, score parsing, LLaVA-Med relative scores, faults and resume over HTTP."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from exgra_med.eval.chatbot import judge_messages, main, parse_scores, summarize
from exgra_med.llm_client import InvalidReply

_spec = importlib.util.spec_from_file_location(
    "fake_openai", Path(__file__).parents[1] / "llm_client" / "fake_openai.py"
)
fake_openai = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_openai)
FakeOpenAI = fake_openai.FakeOpenAI

SECRET = "sk-judge-SECRET-77"


def test_parse_scores() -> None:
    assert parse_scores("\n8 6\nAssistant 1 is better") == [8.0, 6.0]
    assert parse_scores("7.5, 9") == [7.5, 9.0]
    for bad in ("Both are good", "8\n6", "8 6 5", "11 3"):
        with pytest.raises(InvalidReply, match="two scores"):
            parse_scores(bad)


def test_judge_sees_reference_as_assistant_1() -> None:
    sample = {
        "caption": "CT of the chest.",
        "fig_label": "Fig 1",
        "mention": "as shown",
        "question": "What?",
        "reference": "REF ANSWER",
        "answer": "MODEL ANSWER",
    }
    system, user = judge_messages(sample)
    text = user["content"]
    assert system["role"] == "system" and user["role"] == "user"
    assert text.index("[Assistant 1]\nREF ANSWER") < text.index("[Assistant 2]\nMODEL ANSWER")
    assert (
        "Fig 1: CT of the chest." in text and "helpfulness, relevance, accuracy and level of detail" in text
    )
    no_context = judge_messages({**sample, "caption": "", "mention": ""})[1]["content"]
    assert "[Context]" not in no_context


def test_summarize_matches_llava_med_definitions() -> None:
    reviews = [
        {"category": "conversation", "domain": "mri", "tuple": [8.0, 6.0]},
        {"category": "conversation", "domain": "ct_scan", "tuple": [10.0, 5.0]},
        {"category": "detailed_description", "domain": "mri", "tuple": [5.0, 5.0]},
    ]
    s = summarize(reviews)
    assert s["all"]["count"] == 3
    assert s["all"]["reference_score"] == pytest.approx(23 / 3)
    assert s["all"]["model_score"] == pytest.approx(16 / 3)
    assert s["all"]["relative_score"] == pytest.approx(16 / 23 * 100)  # ratio of means
    assert s["all"]["item_relative_score"] == pytest.approx((0.75 + 0.5 + 1.0) / 3 * 100)  # mean of ratios
    assert s["conversation"]["relative_score"] == pytest.approx(11 / 18 * 100)
    assert s["mri"]["count"] == 2 and s["detailed_description"]["relative_score"] == pytest.approx(100.0)
    zero = summarize([{"category": "c", "domain": None, "tuple": [0.0, 3.0]}])
    assert zero["c"]["relative_score"] is None and zero["c"]["item_relative_score"] is None


def _write_inputs(tmp_path: Path, n: int) -> tuple[Path, Path]:
    questions, answers = [], []
    for i in range(n):
        domain = {
            "chest_xray": i % 2 == 0,
            "mri": i % 2 == 1,
            "histology": False,
            "gross": False,
            "ct_scan": False,
        }
        questions.append(
            {
                "question_id": i,
                "text": f"Describe [[{i}]]\n<image>",
                "type": ["conversation", "detailed_description"][i % 2],
                "fig_caption": "caption",
                "fig_label": "Fig",
                "in_text_mention": "m",
                "domain": domain,
                "gpt4_answer": f"reference {i}",
            }
        )
        answers.append({"question_id": i, "text": f"model answer {i}", "answer_id": f"a{i}"})
    q, a = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in questions))
    a.write_text("".join(json.dumps(x) + "\n" for x in answers))
    return q, a


def test_review_with_faults_then_resume(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for var in ("OPENROUTER_API_KEY", "OPENROUTER_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("EXGRA_MED_API_BASE_DELAY", "0.01")
    q, a = _write_inputs(tmp_path, 6)
    out = tmp_path / "review"
    scores = {"0": "8 6", "1": "10 5", "2": "6 6", "3": "9 9", "4": "8 4", "5": "5 10"}
    plan = {"0": ["429:0", "500"], "1": ["badscore"], "2": ["timeout:3.0"], "5": ["badscore"] * 3}
    args = [
        "--question-file",
        str(q),
        "--answers",
        str(a),
        "--out",
        str(out),
        "--judge-model",
        "judge",
        "--no-progress",
        "--max-attempts",
        "3",
        "--request-timeout",
        "1.5",
    ]
    with FakeOpenAI(plan, reply=fake_openai.judge_reply(scores)) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        assert main(args) == 1
        assert dict(server.counts()) == {"0": 3, "1": 2, "2": 2, "3": 1, "4": 1, "5": 3}
    reviews = [json.loads(x) for x in (out / "reviews.jsonl").read_text().splitlines()]
    failures = [json.loads(x) for x in (out / "reviews.jsonl.failures.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in reviews] == [0, 1, 2, 3, 4] and [
        f["question_id"] for f in failures
    ] == [5]
    assert reviews[1]["tuple"] == [10.0, 5.0] and reviews[1]["category"] == "detailed_description"
    assert reviews[1]["domain"] == "mri" and reviews[0]["domain"] == "chest_xray"
    summary = json.loads((out / "summary.json").read_text())["scores"]
    assert summary["all"]["relative_score"] == pytest.approx((6 + 5 + 6 + 9 + 4) / (8 + 10 + 6 + 9 + 8) * 100)
    assert summary["conversation"]["count"] == 3
    # retries: q0 2, q1 1, q2 1, q5 2 (then failed); paid replies: 1 + 2 + 1 + 1 + 1 + 3 = 9 x 15 tokens
    assert "6 retries, 135 tokens" in capsys.readouterr().out

    with FakeOpenAI(reply=fake_openai.judge_reply(scores)) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        assert main(args) == 2  # existing progress needs --resume
        assert main(args + ["--resume"]) == 0
        assert dict(server.counts()) == {"5": 1}
    reviews = [json.loads(x) for x in (out / "reviews.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in reviews] == list(range(6))
    summary = json.loads((out / "summary.json").read_text())["scores"]
    assert summary["all"]["item_relative_score"] == pytest.approx(
        (6 / 8 + 5 / 10 + 1 + 1 + 4 / 8 + 10 / 5) / 6 * 100
    )
    for path in out.iterdir():
        assert SECRET not in path.read_text()
