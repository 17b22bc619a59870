"""scripts/chatbot_eval.sh against the fake judge: review, summary, and resume on a rerun."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "fake_openai", Path(__file__).parents[1] / "llm_client" / "fake_openai.py"
)
fake_openai = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_openai)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "chatbot_eval.sh"


def test_chatbot_script(tmp_path) -> None:
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text(
        "".join(
            json.dumps(
                {
                    "question_id": i,
                    "text": f"Q [[{i}]]\n<image>",
                    "type": "conversation",
                    "gpt4_answer": f"ref {i}",
                }
            )
            + "\n"
            for i in range(3)
        )
    )
    a.write_text("".join(json.dumps({"question_id": i, "text": f"ans {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "review"
    with fake_openai.FakeOpenAI(
        reply=fake_openai.judge_reply({"0": "8 4", "1": "10 5", "2": "6 3"})
    ) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENROUTER_")}
        env.update(
            {
                "PYTHON": sys.executable,
                "QUESTIONS": str(q),
                "ANSWERS": str(a),
                "OUT": str(out),
                "OPENAI_API_KEY": "sk-script",
                "OPENAI_BASE_URL": server.base_url,
            }
        )
        for _ in range(2):  # the rerun passes --resume itself and requests nothing new
            run = subprocess.run(
                ["bash", str(SCRIPT), "--no-progress"],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert run.returncode == 0, run.stderr[-2000:]
        assert sum(server.counts().values()) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores"]["conversation"]["relative_score"] == 50.0
    assert "conversation" in run.stdout and "50.0" in run.stdout
