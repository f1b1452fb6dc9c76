"""The command line (charlm/cli.py) through typer.testing.CliRunner: one end-to-end chain
(train -> sample -> score), the JSON outputs, --help, and one test per documented failure."""
import json
import math
import os

import pytest
import typer

from charlm.cli import app as cli
from charlm.lm import checkpoint
from tests.helpers import SCORE_KEYS, TINY, failed, make_checkpoint, ok, option_blocks

TRAIN_TINY = ["--steps", "3", "--hidden", "8", "--layers", "1", "--embed", "4", "--seq-len", "8",
              "--batch", "2", "--eval-every", "2", "--sample-length", "10"]
EVAL_KEYS = {"event", "step", "train_loss", "val_bpc", "tokens_per_s", "lr"}
DONE_KEYS = {"event", "steps", "tokens", "seconds", "tokens_per_s", "best_val_bpc", "clipped_fraction",
             "grad_norm_median", "checkpoint", "reason"}


def score_json(result):
    return json.loads(ok(result).stdout)


# ------------------------------------------------------------ end to end
def test_train_sample_score_chain(run_cli, tmp_path):
    ok(run_cli("train", TINY, *TRAIN_TINY, "--out", "run"))
    run = tmp_path / "run"
    assert (run / "latest.npz").is_file() and (run / "best.npz").is_file()
    assert sorted(p.name for p in run.iterdir()) == ["best.npz", "latest.npz", "tokens.bin"]
    ck = checkpoint.load(run / "latest.npz")
    assert ck.step == 3
    assert (ck.model.hidden, ck.model.layers, ck.model.embed, ck.model.cell) == (8, 1, 4, "lstm")
    assert (ck.train.seq_len, ck.train.batch) == (8, 2)
    assert set(ck.vocab.tokens) == set(TINY.read_text(encoding="utf-8"))

    # sample: the same seed gives the same text, of the requested length
    a = ok(run_cli("sample", "--model", "run", "--length", "20", "--seed", "1")).stdout
    b = ok(run_cli("sample", "--model", "run", "--length", "20", "--seed", "1")).stdout
    assert a == b
    assert a.endswith("\n") and len(a) == 21
    assert set(a[:-1]) <= set(ck.vocab.tokens)
    c = ok(run_cli("sample", "--model", "run", "--length", "20", "--seed", "2", "--temp", "2.0")).stdout
    assert c != a
    primed = ok(run_cli("sample", "--model", "run", "--length", "5", "--seed", "1", "--prime", "The ")).stdout
    assert primed.startswith("The ") and len(primed) == 4 + 5 + 1
    g1 = ok(run_cli("sample", "--model", "run/best.npz", "--length", "15", "--greedy")).stdout
    g2 = ok(run_cli("sample", "--model", "run", "--length", "15", "--greedy", "--seed", "7")).stdout
    assert g1 == g2

    # score one text
    r = score_json(run_cli("score", "some text", "--model", "run", "--json"))
    assert set(r) == SCORE_KEYS
    assert r["n_tokens"] == len("some text") + 1 == len(r["tokens"])
    assert r["oov"] == 0
    assert "".join(t["token"] for t in r["tokens"]) == "some text\n"
    assert r["logprob"] == pytest.approx(math.fsum(t["logprob"] for t in r["tokens"]), rel=1e-9)
    assert r["perplexity"] == pytest.approx(math.exp(-r["logprob"] / r["n_tokens"]), rel=1e-9)
    assert r["log10prob"] == pytest.approx(r["logprob"] / math.log(10), rel=1e-9)
    one_thread = score_json(run_cli("score", "some text", "--model", "run", "--json", "--threads", "1"))
    assert one_thread["logprob"] == pytest.approx(r["logprob"], rel=1e-6)  # threads change sums' order only
    failed(run_cli("score", "some text", "--model", "run", "--threads", "0"), "--threads")
    no_eos = score_json(run_cli("score", "some text", "--model", "run", "--json", "--no-eos"))
    assert no_eos["n_tokens"] == len("some text")
    assert no_eos["tokens"][-1]["token"] == "t"

    # score a file of two lines, and the same lines from standard input
    f = tmp_path / "texts.txt"
    f.write_text("the old man\nthe \u2603 pear\n", encoding="utf-8")
    many = score_json(run_cli("score", "--file", f, "--model", "run", "--json"))
    assert set(many) == {"texts", "total"}
    assert len(many["texts"]) == 2
    assert [set(t) for t in many["texts"]] == [SCORE_KEYS, SCORE_KEYS]
    assert many["total"]["n_texts"] == 2
    assert many["total"]["oov"] == 1
    assert many["total"]["n_tokens"] == sum(t["n_tokens"] for t in many["texts"])
    assert many["total"]["logprob"] == pytest.approx(sum(t["logprob"] for t in many["texts"]), rel=1e-12)
    single = score_json(run_cli("score", "the old man", "--model", "run", "--json"))
    assert many["texts"][0]["logprob"] == pytest.approx(single["logprob"], rel=1e-12)
    piped = score_json(run_cli("score", "-", "--model", "run", "--json", input="the old man\nthe \u2603 pear\n"))
    assert piped == many

    # the human-readable table
    table = ok(run_cli("score", "some text", "--model", "run")).stdout
    assert "perplexity" in table and "ln P" in table


def test_train_json_prints_eval_and_done_lines(run_cli, tmp_path):
    res = ok(run_cli("train", TINY, *TRAIN_TINY, "--out", "run", "--json"))
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert len(lines) == len(res.stdout.strip().splitlines())  # every stdout line is JSON
    evals = [e for e in lines if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 3]  # every --eval-every 2 steps, and at the end
    for e in evals:
        assert set(e) == EVAL_KEYS
        assert e["train_loss"] > 0 and e["val_bpc"] > 0 and e["tokens_per_s"] > 0
    done = lines[-1]
    assert done["event"] == "done"
    assert set(done) == DONE_KEYS
    assert done["steps"] == 3
    assert done["tokens"] == 3 * 8 * 2  # steps * seq_len * batch
    assert done["best_val_bpc"] == pytest.approx(min(e["val_bpc"] for e in evals))
    assert os.path.samefile(done["checkpoint"], tmp_path / "run" / "best.npz")


def test_train_from_standard_input(run_cli, tmp_path):
    res = ok(run_cli("train", "-", *TRAIN_TINY, "--steps", "1", "--out", "run", "--json",
                     input=TINY.read_text(encoding="utf-8")))
    assert json.loads(res.stdout.splitlines()[-1])["steps"] == 1
    assert checkpoint.load(tmp_path / "run" / "latest.npz").corpus == "stdin"


def test_train_errors_replace_accepts_bad_bytes(run_cli, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(TINY.read_bytes() + b"\xff tail\n")
    ok(run_cli("train", bad, *TRAIN_TINY, "--steps", "1", "--out", "run", "--json", "--errors", "replace"))
    assert "\ufffd" in checkpoint.load(tmp_path / "run" / "latest.npz").vocab.tokens


def test_sample_and_score_default_to_the_most_recent_run(run_cli, tmp_path):
    ok(run_cli("train", TINY, *TRAIN_TINY, "--json", "--seed", "1"))
    ok(run_cli("train", TINY, *TRAIN_TINY, "--json", "--seed", "2"))
    runs = sorted((tmp_path / "models").iterdir())
    assert len(runs) == 2
    assert all(r.name.startswith("tiny-lstm-") for r in runs)  # the default run folder name

    def sample(*model):
        return ok(run_cli("sample", *model, "--length", "30", "--seed", "3", "--temp", "1.5")).stdout

    def score(*model):
        return score_json(run_cli("score", "pears", "--json", *model))["logprob"]

    by_run = {r: (sample("--model", r), score("--model", r)) for r in runs}
    assert by_run[runs[0]] != by_run[runs[1]]  # the two runs are distinguishable
    for newest in (runs[0], runs[1], runs[0]):
        for r in runs:
            t = 3_000_000 if r == newest else 2_000_000
            for f in r.iterdir():
                os.utime(f, (t, t))
        assert (sample(), score()) == by_run[newest]


# ------------------------------------------------------------------ help
@pytest.mark.parametrize("name", ["train", "sample", "score"])
def test_help_shows_every_default(run_cli, name):
    res = ok(run_cli(name, "--help"))
    text = res.stdout
    assert "\x1b[" not in text
    blocks = option_blocks(text)
    command = typer.main.get_command(cli.app).commands[name]
    checked = 0
    for p in command.params:
        if not p.opts[0].startswith("--") or p.name == "help":
            continue
        opt = p.opts[0]
        assert opt in blocks, f"{opt} missing from --help"
        assert (p.help or "").split()[0] in blocks[opt], f"{opt} has no help text"
        if p.show_default is False or p.default is None:
            continue  # documented in the help sentence instead (e.g. "Default: random")
        if p.default == "":
            continue  # Click prints no default for an empty string (--prime): nothing to show
        if getattr(p, "is_flag", False) and not p.secondary_opts:
            continue  # Click never prints the default of a one-sided off-by-default flag
        if getattr(p, "is_flag", False):
            want = p.opts[0][2:] if p.default else p.secondary_opts[0][2:]
        else:
            want = str(p.default)
        assert f"[default: {want}]" in blocks[opt], (opt, blocks[opt])
        checked += 1
    assert checked >= {"train": 15, "sample": 4, "score": 0}[name]


def test_help_of_the_app_lists_the_commands(run_cli):
    text = ok(run_cli("--help")).stdout
    for name in ("train", "sample", "score"):
        assert name in text


def test_temp_default_text(run_cli):
    assert "[default: 0.8]" in option_blocks(ok(run_cli("sample", "--help")).stdout)["--temp"]


# -------------------------------------------------------------- failures
def test_missing_corpus(run_cli, tmp_path):
    failed(run_cli("train", "nope.txt", *TRAIN_TINY), "not found", "nope.txt")
    assert not (tmp_path / "models").exists()


def test_corpus_is_a_directory(run_cli, tmp_path):
    (tmp_path / "adir").mkdir()
    failed(run_cli("train", "adir", *TRAIN_TINY), "directory")


@pytest.mark.parametrize("content", [b"", b"   \n\n\t  \r\n", b"\xef\xbb\xbf"])
def test_empty_or_whitespace_corpus(run_cli, tmp_path, content):
    (tmp_path / "empty.txt").write_bytes(content)
    failed(run_cli("train", "empty.txt", *TRAIN_TINY), "empty")
    assert not (tmp_path / "models").exists()


def test_corpus_shorter_than_a_training_window(run_cli, tmp_path):
    (tmp_path / "short.txt").write_text("A short text that is not long enough.\n")
    err = failed(run_cli("train", "short.txt", *TRAIN_TINY, "--seq-len", "64"), "--seq-len")
    assert "64" in err
    assert not (tmp_path / "models").exists()


def test_invalid_utf8_corpus(run_cli, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text, then \x80 a bad byte\n" * 10)
    failed(run_cli("train", "bad.txt", *TRAIN_TINY), "offset 16", "0x80", "--errors replace", "--encoding")


@pytest.mark.parametrize("command", [["sample"], ["score", "some text"]])
def test_no_model_found(run_cli, tmp_path, command):
    failed(run_cli(*command), "no trained model", "charlm train")
    (tmp_path / "models" / "empty-run").mkdir(parents=True)
    failed(run_cli(*command), "no trained model", "charlm train")


def test_model_path_does_not_exist(run_cli):
    failed(run_cli("sample", "--model", "missing.npz"), "not found", "missing.npz")


def test_model_is_not_a_checkpoint(run_cli, tmp_path):
    (tmp_path / "notes.npz").write_text("hello\n" * 50)
    failed(run_cli("sample", "--model", "notes.npz"), "notes.npz", "not a charlm checkpoint")
    failed(run_cli("score", "hi", "--model", "notes.npz"), "notes.npz", "not a charlm checkpoint")


def test_model_is_a_truncated_checkpoint(run_cli, tmp_path):
    checkpoint.save(make_checkpoint(), tmp_path / "run" / "best.npz")
    raw = (tmp_path / "run" / "best.npz").read_bytes()
    (tmp_path / "run" / "best.npz").write_bytes(raw[: len(raw) * 2 // 3])
    failed(run_cli("sample", "--model", "run"), "best.npz", "truncated")


def test_a_working_hand_made_checkpoint_is_accepted(run_cli, tmp_path):
    """Guards the truncation test: the untruncated file does work."""
    checkpoint.save(make_checkpoint(), tmp_path / "run" / "best.npz")
    assert len(ok(run_cli("sample", "--model", "run", "--length", "5", "--seed", "0")).stdout) == 6


@pytest.mark.parametrize("option, value", [
    ("--temp", "-0.5"), ("--length", "0"), ("--length", "-3"), ("--top-k", "-1")])
def test_sample_rejects_non_positive_values(run_cli, option, value):
    failed(run_cli("sample", option, value), option, "positive")


@pytest.mark.parametrize("option, value", [
    ("--hidden", "0"), ("--hidden", "-8"), ("--lr", "0"), ("--lr", "-0.1"), ("--layers", "0"),
    ("--seq-len", "0"), ("--seq-len", "-8"), ("--batch", "0"), ("--embed", "0"),
    ("--steps", "0"), ("--eval-every", "0")])
def test_train_rejects_non_positive_values(run_cli, tmp_path, option, value):
    failed(run_cli("train", TINY, *TRAIN_TINY, option, value), option, "positive")
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("option, value, needle", [
    ("--cell", "transformer", "--cell"), ("--optimizer", "rmsprop", "--optimizer"),
    ("--dropout", "1.0", "--dropout"), ("--val-frac", "0.9", "--val-frac"), ("--clip", "-1", "--clip"),
    ("--errors", "explode", "--errors"), ("--encoding", "klingon", "--encoding")])
def test_train_rejects_bad_choices(run_cli, option, value, needle):
    failed(run_cli("train", TINY, *TRAIN_TINY, option, value), needle)


def test_output_folder_cannot_be_created(run_cli, tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder")
    failed(run_cli("train", TINY, *TRAIN_TINY, "--out", "blocker/run"), "blocker")
    assert (tmp_path / "blocker").read_text() == "a file, not a folder"


def test_score_needs_exactly_one_input(run_cli, tmp_path):
    failed(run_cli("score"), "TEXT")
    (tmp_path / "t.txt").write_text("x\n")
    failed(run_cli("score", "hi", "--file", "t.txt"), "not both")


def test_score_empty_input(run_cli, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    failed(run_cli("score", "--file", "empty.txt"), "empty")
    failed(run_cli("score", "-", input=""), "empty")


def test_score_missing_file(run_cli):
    failed(run_cli("score", "--file", "nope.txt"), "not found", "nope.txt")


def test_eval_counts_an_eos_for_a_last_line_without_newline(run_cli, tmp_path):
    ok(run_cli("train", TINY, *TRAIN_TINY, "--out", "run"))
    (tmp_path / "a.txt").write_text("the end of it\nand more\n")
    (tmp_path / "b.txt").write_text("the end of it\nand more")
    a = json.loads(ok(run_cli("eval", "a.txt", "--model", "run", "--json")).stdout)
    b = json.loads(ok(run_cli("eval", "b.txt", "--model", "run", "--json")).stdout)
    assert a["n_tokens"] == b["n_tokens"] == len("the end of it\nand more\n")
    assert a["logprob"] == b["logprob"]


def test_entry_point_starts_without_the_cyclic_gc_and_train_turns_it_back_on(run_cli, monkeypatch):
    """charlm._entry.main (the console script and python -m charlm) runs the CLI with the
    collector off (start-up speed); training, a long run, turns it back on."""
    import gc

    from charlm import _entry
    seen = []
    monkeypatch.setattr(cli, "main", lambda: seen.append(gc.isenabled()))
    try:
        _entry.main()
        assert seen == [False]
        ok(run_cli("train", TINY, *TRAIN_TINY, "--steps", "1", "--out", "run", "--json"))
        assert gc.isenabled()
    finally:
        gc.enable()


def test_entry_point_turns_the_gc_back_on_after_start_up(monkeypatch):
    """A long command that never calls gc_on (eval of a big file) still gets the collector
    back after START_UP_S seconds."""
    import gc
    import time

    from charlm import _entry
    monkeypatch.setattr(_entry, "START_UP_S", 0.05)
    seen = []

    def slow_command():
        seen.append(gc.isenabled())
        deadline = time.monotonic() + 30.0  # generous: only the timer thread has to run
        while not gc.isenabled() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(gc.isenabled())
    monkeypatch.setattr(cli, "main", slow_command)
    try:
        _entry.main()
        assert seen == [False, True]
    finally:
        gc.enable()


def test_gc_on_freezes_start_up_objects_once():
    import gc

    from charlm import _entry
    gc.disable()
    try:
        before = gc.get_freeze_count()
        _entry.gc_on()
        assert gc.isenabled() and gc.get_freeze_count() > before
        n = gc.get_freeze_count()
        _entry.gc_on()  # already on: nothing more frozen
        assert gc.get_freeze_count() == n
    finally:
        gc.enable()
        gc.unfreeze()
