"""Loss-curve and data-efficiency figures: the data read back and the PNG written."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from exgra_med.eval.plots import find_trainer_state, loss_curves, main, read_efficiency


def _state(path, history):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"global_step": 3, "log_history": history}))


HISTORY = [
    {"step": 1, "loss": 3.0, "lm_loss": 2.5, "align_loss": 0.5, "learning_rate": 1e-4},
    {"step": 2, "loss": 2.0, "lm_loss": 1.6, "align_loss": 0.4},
    {"step": 2, "eval_loss": 2.2},
    {"step": 3, "loss": 1.5, "lm_loss": 1.2, "align_loss": 0.3},
]


def test_loss_curves_from_newest_checkpoint(tmp_path):
    _state(tmp_path / "checkpoint-9" / "trainer_state.json", HISTORY[:1])
    _state(tmp_path / "checkpoint-10" / "trainer_state.json", HISTORY)
    (tmp_path / "checkpoint-11-tmp").mkdir()
    path = find_trainer_state(tmp_path)
    assert path.parent.name == "checkpoint-10"
    curves = loss_curves(path)
    assert curves["loss"] == ([1, 2, 3], [3.0, 2.0, 1.5])
    assert curves["lm_loss"] == ([1, 2, 3], [2.5, 1.6, 1.2])
    assert curves["align_loss"] == ([1, 2, 3], [0.5, 0.4, 0.3])
    _state(tmp_path / "trainer_state.json", HISTORY[:2])  # a final state in the run dir wins
    assert loss_curves(find_trainer_state(tmp_path))["loss"] == ([1, 2], [3.0, 2.0])
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        find_trainer_state(tmp_path / "nowhere")


def test_plot_losses_png(tmp_path):
    _state(tmp_path / "run" / "trainer_state.json", HISTORY)
    out = tmp_path / "figs" / "losses.png"
    assert main(["losses", str(tmp_path / "run"), "--out", str(out), "--dpi", "50"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (400, 250)  # 8 x 5 inches at 50 dpi
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_efficiency_csv_and_png(tmp_path):
    csv = tmp_path / "results.csv"
    csv.write_text(
        "method,fraction,dataset,score\n"
        "ExGra-Med,0.4,VQA-RAD,70.1\nExGra-Med,0.1,VQA-RAD,66.4\nLLaVA-Med,0.1,VQA-RAD,52.39\n"
        "LLaVA-Med,1.0,VQA-RAD,72.64\nLLaVA-Med,0.1,PathVQA,56.15\nExGra-Med,0.1,PathVQA,63.0\n"
    )
    table = read_efficiency(csv)
    assert table["VQA-RAD"]["ExGra-Med"] == [(0.1, 66.4), (0.4, 70.1)]
    assert table["VQA-RAD"]["LLaVA-Med"] == [(0.1, 52.39), (1.0, 72.64)]
    assert table["PathVQA"] == {"LLaVA-Med": [(0.1, 56.15)], "ExGra-Med": [(0.1, 63.0)]}
    assert main(["efficiency", str(csv), "--dpi", "40"]) == 0
    with Image.open(tmp_path / "results.png") as im:
        assert im.size == (360, 160)  # two panels: 9 x 4 inches at 40 dpi
    bad = tmp_path / "bad.csv"
    bad.write_text("method,fraction,score\nA,0.1,3\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['dataset'\]"):
        read_efficiency(bad)
