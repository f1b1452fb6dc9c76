"""`charlm qa ...` through typer.testing.CliRunner: train -> eval -> ask, babi, and each documented failure."""
import json
import shutil

import pytest

from tests.helpers import DATA, failed, ok

TRAIN = DATA / "qa_tiny_train.txt"
TEST = DATA / "qa_tiny_test.txt"
SMALL = ["--epochs", "8", "--dim", "8", "--hops", "2"]
STORY = "Mary went to the kitchen. John moved to the garden. Mary journeyed to the office."


@pytest.fixture
def model(run_cli, tmp_path):
    ok(run_cli("qa", "train", TRAIN, *SMALL, "--out", "m"))
    return tmp_path / "m"


def test_train_eval_ask_chain(run_cli, model):
    assert (model / "best.npz").is_file()
    r = json.loads(ok(run_cli("qa", "eval", TEST, "--model", model, "--json")).stdout)
    assert set(r) == {"n_questions", "accuracy", "error_pct"}
    assert r["n_questions"] == 18 and r["error_pct"] == pytest.approx(100 * (1 - r["accuracy"]))
    text = ok(run_cli("qa", "eval", TEST, "--model", model / "best.npz")).stdout
    assert "questions = 18" in text and "error = " in text
    shown = ok(run_cli("qa", "ask", "--model", model, "--story", STORY, "Where is Mary?")).stdout
    assert "hop 1" in shown and "hop 2" in shown and "Mary journeyed to the office" in shown
    assert shown.count("*") >= 2 and "A: " in shown


def test_ask_json_attention_sums_to_one_per_hop(run_cli, model, tmp_path):
    r = json.loads(ok(run_cli("qa", "ask", "--model", model, "--story", STORY, "Where is Mary?", "--json")).stdout)
    assert set(r) >= {"answer", "probability", "hops", "memories"}
    assert len(r["memories"]) == 3 and len(r["hops"]) == 2
    for h in r["hops"]:
        assert len(h["weights"]) == 3
        assert sum(h["weights"]) == pytest.approx(1.0, abs=1e-6)
        assert h["selected"] == max(range(3), key=lambda i: h["weights"][i])
        assert h["selected_sentence"] == r["memories"][h["selected"]]
    assert 0 < r["probability"] <= 1
    (tmp_path / "story.txt").write_text("1 Mary went to the kitchen.\n2 John moved to the garden.\n")
    r2 = json.loads(ok(run_cli("qa", "ask", "--model", model, "--story-file", "story.txt", "Where is John?",
                               "--json")).stdout)
    assert r2["memories"] == ["Mary went to the kitchen", "John moved to the garden"]
    r3 = json.loads(ok(run_cli("qa", "ask", "--model", model, "--story-file", "-", "Where is John?", "--json",
                               input="John went to the hallway.\n")).stdout)
    assert r3["memories"] == ["John went to the hallway"]


def test_train_json_and_stdin(run_cli, tmp_path):
    res = ok(run_cli("qa", "train", "-", *SMALL, "--out", "s", "--json", "--encoder", "bigru",
                     input=TRAIN.read_text()))
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["event"] for x in lines] == ["epoch"] * 8 + ["done"]
    assert lines[-1]["checkpoint"] == "s/best.npz" and lines[0]["phase"] == "linear"
    assert {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"} <= set(lines[0])


def test_babi_command_on_a_small_folder(run_cli, tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    for t in (1, 2):
        shutil.copy(TRAIN, d / f"qa{t}_tiny_train.txt")
        shutil.copy(TEST, d / f"qa{t}_tiny_test.txt")
    r = json.loads(ok(run_cli("qa", "babi", d, "--tasks", "1-2", *SMALL, "--json")).stdout)
    assert [t["task"] for t in r["tasks"]] == [1, 2]
    assert r["tasks"][0]["ref_memn2n"] == 0.0 and r["tasks"][1]["ref_memn2n"] == 8.3
    assert r["failed"] == sum(t["test_error_pct"] > 5 for t in r["tasks"])
    assert r["mean_error_pct"] == pytest.approx(sum(t["test_error_pct"] for t in r["tasks"]) / 2)
    assert r["reference"]["memn2n"] == {"mean_error_pct": 13.9, "failed": 11}
    text = ok(run_cli("qa", "babi", d, "--tasks", "2", *SMALL, "--out", "runs")).stdout
    assert "MemN2N" in text and "mean" in text and "failed" in text
    assert (tmp_path / "runs" / "qa2" / "best.npz").is_file()
    failed(run_cli("qa", "babi", d, "--tasks", "3", *SMALL), "task 3")
    failed(run_cli("qa", "babi", d, "--tasks", "x", *SMALL), "--tasks")


def test_babi_keeps_the_encoder_with_the_best_validation_accuracy(run_cli, tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    shutil.copy(TRAIN, d / "qa1_tiny_train.txt")
    shutil.copy(TEST, d / "qa1_tiny_test.txt")
    r = json.loads(ok(run_cli("qa", "babi", d, "--tasks", "1", *SMALL, "--encoder", "bow,pe", "--runs", "1,2",
                              "--json", "--out", "runs")).stdout)
    row = r["tasks"][0]
    assert r["encoder"] == "bow,pe" and r["runs"] == [1, 2]
    accs = row["val_acc_by_encoder"]
    assert set(accs) == {"bow", "pe"} and row["best_val_acc"] == max(accs.values())
    assert accs[row["encoder"]] == row["best_val_acc"]
    from charlm.qa.checkpoint import load
    assert load(tmp_path / "runs" / "qa1").config.encoder == row["encoder"]  # the kept model is the one saved
    failed(run_cli("qa", "babi", d, "--tasks", "1", *SMALL, "--encoder", "bow,pe", "--runs", "1,2,3"), "--runs")
    failed(run_cli("qa", "babi", d, "--tasks", "1", *SMALL, "--encoder", "pe,cnn"), "--encoder")


def test_babi_keeps_the_hop_count_with_the_best_validation_accuracy(run_cli, tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    shutil.copy(TRAIN, d / "qa1_tiny_train.txt")
    shutil.copy(TEST, d / "qa1_tiny_test.txt")
    small = [a for a in SMALL if a not in ("--hops", "2")]
    r = json.loads(ok(run_cli("qa", "babi", d, "--tasks", "1", *small, "--hops", "1,2", "--json",
                              "--out", "runs")).stdout)
    row = r["tasks"][0]
    assert r["hops"] == [1, 2]
    accs = row["val_acc_by_encoder"]
    assert set(accs) == {"pe/1", "pe/2"} and row["best_val_acc"] == max(accs.values())
    assert accs[f"pe/{row['hops']}"] == row["best_val_acc"]
    from charlm.qa.checkpoint import load
    assert load(tmp_path / "runs" / "qa1").config.hops == row["hops"]
    text = ok(run_cli("qa", "babi", d, "--tasks", "1", *small, "--hops", "1,2")).stdout
    assert f"pe, {row['hops']} hops" in text
    failed(run_cli("qa", "babi", d, "--tasks", "1", *small, "--hops", "2,x"), "--hops")
    failed(run_cli("qa", "babi", d, "--tasks", "1", *small, "--hops", "0,2"), "--hops")


def test_bad_training_input(run_cli, tmp_path):
    (tmp_path / "bad.txt").write_text("1 Mary went home.\nWhere is Mary?\thome\t1\n")
    failed(run_cli("qa", "train", "bad.txt", *SMALL), "bad.txt:2", "expected 'ID text'")
    (tmp_path / "nostory.txt").write_text("1 Where is Mary?\thome\t1\n")
    failed(run_cli("qa", "train", "nostory.txt", *SMALL), "question with no story")
    failed(run_cli("qa", "train", "missing.txt"), "file not found")
    failed(run_cli("qa", "train", TRAIN, "--encoder", "cnn"), "--encoder")
    failed(run_cli("qa", "train", TRAIN, "--encoder", "bigru", "--dim", "7"), "even --dim")
    failed(run_cli("qa", "train", TRAIN, "--epochs", "0"), "--epochs")
    failed(run_cli("qa", "train", TRAIN, "--repeat-last-fact"), "--supervise-facts")
    failed(run_cli("qa", "train", TRAIN, "--relative", "-1"), "--relative")
    failed(run_cli("qa", "train", TRAIN, "--mlp", "-2"), "--mlp")


def test_relative_mlp_and_repeat_last_fact_train_save_and_answer(run_cli, tmp_path):
    ok(run_cli("qa", "train", TRAIN, *SMALL, "--supervise-facts", "--repeat-last-fact", "--relative", "4",
               "--mlp", "8", "--out", "rm"))
    from charlm.qa import checkpoint as qack
    ck = qack.load(tmp_path / "rm")
    assert ck.config.relative == 4 and ck.config.mlp == 8 and "rel1" in ck.params and "mlp.W1" in ck.params
    assert ck.train["settings"]["repeat_last_fact"] is True
    r = json.loads(ok(run_cli("qa", "ask", "--model", "rm", "--story", STORY, "Where is Mary?", "--json")).stdout)
    assert len(r["hops"]) == 2


def test_bad_ask_and_eval_input(run_cli, model, tmp_path):
    failed(run_cli("qa", "ask", "--model", model, "--story", "Mary went to Paris.", "Where is Mary?"),
           "unknown word", "'paris'")
    failed(run_cli("qa", "ask", "--model", model, "--story", "Mary went home.", "Who is Zorro?"), "'zorro'")
    failed(run_cli("qa", "ask", "--model", model, "--story", " ", "Where is Mary?"), "story is empty")
    failed(run_cli("qa", "ask", "--model", model, "Where is Mary?"), "--story")
    failed(run_cli("qa", "ask", "--model", model, "--story", STORY, "--story-file", "x", "Where?"), "either")
    failed(run_cli("qa", "ask", "--story", STORY, "Where is Mary?"), "--model")
    failed(run_cli("qa", "ask", "--model", model, "--story-file", "none.txt", "Where?"), "story file not found")
    failed(run_cli("qa", "eval", TEST), "--model")
    failed(run_cli("qa", "eval", TEST, "--model", "nowhere"), "model not found")
    raw = (model / "best.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[:len(raw) // 3])
    failed(run_cli("qa", "eval", TEST, "--model", "cut.npz"), "truncated or damaged")
    # a language model where a QA model belongs, and the other way round: each named for what it is
    from tests.helpers import make_checkpoint
    from charlm.lm import checkpoint
    checkpoint.save(make_checkpoint(), tmp_path / "lm.npz")
    failed(run_cli("qa", "eval", TEST, "--model", "lm.npz"), "a charlm language model, not a QA model")
    failed(run_cli("score", "--model", model / "best.npz", "some text"), "charlm-qa-checkpoint")


def test_help_shows_defaults(run_cli):
    text = ok(run_cli("qa", "train", "--help")).stdout
    for needle in ("--encoder", "--hops", "--memory-size", "--supervise-facts", "default: pe", "default: 50"):
        assert needle in text, needle
