"""`charlm info` and `charlm plot` (issue 16): what a checkpoint holds, and its training curves in
one unit with the best step marked; the same values from the library."""
from __future__ import annotations

import json
import math
import sys

import pytest

import charlm
from charlm.lm import checkpoint
from helpers import failed, ok, train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("info") / "run"
    train_tiny(path, steps=5)
    return path


def test_info_json_is_the_library_info(run_cli, run):
    d = json.loads(ok(run_cli("info", str(run), "--json")).stdout)
    lm = charlm.load(run)
    assert d == json.loads(json.dumps(lm.info()))
    ck = checkpoint.load(run / "best.npz")
    assert d["vocab_size"] == len(ck.vocab) and d["vocab_sample"] == list(ck.vocab.tokens[:20])
    assert d["parameters"] == sum(a.size for a in ck.params.values())
    assert d["steps"] == ck.step and d["config"]["cell"] == "lstm" and d["unit"] == "bpc"
    vals = [(h["val_loss"], h["step"]) for h in ck.history if h.get("val_loss") is not None]
    best_loss, best_step = min(vals)
    assert d["best_step"] == best_step
    assert d["best_val"] == pytest.approx(ck.best_val_loss / math.log(2))
    table = ok(run_cli("info", str(run))).stdout
    assert "best validation" in table and f"at step {best_step}" in table and "bits/char" in table


def test_plot_writes_a_png_with_curves_in_one_unit(run_cli, run, tmp_path):
    pytest.importorskip("matplotlib")
    res = ok(run_cli("plot", str(run), "-o", "c.png", "--json"))
    c = json.loads(res.stdout.splitlines()[-1])
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    ck = checkpoint.load(run / "best.npz")
    assert c["steps"] == [h["step"] for h in ck.history]
    for h, t, v in zip(ck.history, c["train"], c["val"]):
        assert t == pytest.approx(h["train_loss"] / math.log(2)) and v == pytest.approx(h["val_loss"] / math.log(2))
    assert c["unit"] == "bpc" and c["best_val"] == min(c["val"])


def test_plot_without_matplotlib_is_one_clear_line(run_cli, run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    failed(run_cli("plot", str(run), "-o", "c.png"), 'pip install "charlm[plot]"')


def test_info_of_a_file_that_is_not_a_checkpoint(run_cli, tmp_path):
    (tmp_path / "small.txt").write_text("hello\n")
    err = failed(run_cli("info", "small.txt"), "small.txt")
    assert "allow_pickle" not in err


def test_done_flags_an_absurd_validation_loss_and_names_the_best_step():
    from charlm.lm.info import done_validation
    hist = [{"step": 2, "val_loss": 3.0}, {"step": 4, "val_loss": 2.5}, {"step": 6, "val_loss": None}]
    assert done_validation(hist, 2.5, 65) == {"best_step": 4, "val_absurd": False}
    assert done_validation(hist, 2.0e6, 65)["val_absurd"]          # 2.9 million bits per character
    assert done_validation([], None, 65) == {"best_step": None, "val_absurd": False}
    assert done_validation([], float("inf"), 65)["val_absurd"]


def test_train_done_event_has_the_flag(run):
    from charlm.lm.train import train  # noqa: F401  (the event comes from the same loop as the CLI's)
    events = train_tiny(run.parent / "again", steps=2)
    done = events[-1]
    assert done["event"] == "done" and done["val_absurd"] is False and done["best_step"] == 2


def test_info_names_the_word_model_options():
    from charlm.cli.info import _options
    assert _options({"cell": "lstm", "dropout": 0.0}) == ""
    assert _options({"tie": True, "dropout": 0.2, "dropout_in": 0.3, "dropout_out": 0.4, "variational": True}) == \
        ", tied decoder, variational dropout 0.2, in 0.3, out 0.4"
    assert _options({"softmax": "adaptive", "cutoffs": [20, 100], "div_value": 2.0, "dropout_out": 0.1}) == \
        ", adaptive softmax (cutoffs 20,100, div 2), dropout out 0.1"
