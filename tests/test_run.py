"""Run planning (charlm.lm.run) without the command line: what the options of `charlm train` mean,
which combinations are refused and with what message, and one tiny run through charlm.lm.run.train()."""
import os

import pytest

from charlm.errors import CharlmError
from charlm.lm import checkpoint, run
from charlm.runtime import compute_threads
from tests.helpers import TINY, TINY_MODEL, TINY_TRAIN, train_tiny

SMALL = {**TINY_MODEL, **{k: v for k, v in TINY_TRAIN.items() if k != "steps"}}


def refused(*needles, corpus=TINY, **options) -> str:
    """plan() refuses the options with a message holding every needle; the message."""
    with pytest.raises(CharlmError) as e:
        run.plan(corpus, **options)
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory with a tiny LSTM trained 3 steps (latest.npz and best.npz)."""
    path = tmp_path_factory.mktemp("trained") / "run"
    with compute_threads(1):
        train_tiny(path)
    return path


def test_defaults_are_the_command_lines():
    p = run.plan(TINY, out="somewhere")
    assert p.model.cell == "lstm" and p.model.hidden == 256 and p.model.layers == 2 and p.model.embed == 64
    assert p.train.seq_len == 64 and p.train.batch == 32 and p.train.lr == 2e-3 and p.train.eval_every == 500
    assert p.train.minutes == run.DEFAULT_MINUTES and p.train.steps == 0      # no budget given: 3 minutes
    assert p.corpus_name == "tiny.txt" and str(p.run_dir) == "somewhere" and p.sample_length == 200
    assert p.resume is None and p.init_from is None


def test_a_budget_given_replaces_the_default_minutes():
    p = run.plan(TINY, steps=5, out="x")
    assert (p.train.steps, p.train.minutes) == (5, 0.0)


def test_the_run_directory_is_named_after_corpus_and_cell(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_MODELS_DIR", str(tmp_path))
    p = run.plan(TINY, cell="gru")
    assert p.run_dir.parent == tmp_path and p.run_dir.name.startswith("tiny-gru-")
    p.run_dir.mkdir()
    again = run.run_dir_name("tiny.txt", "gru")
    assert again != p.run_dir and again.name.startswith(p.run_dir.name)   # -2 when the name is taken


def test_unknown_options_are_a_type_error():
    with pytest.raises(TypeError, match="hiden"):
        run.plan(TINY, hiden=8)


@pytest.mark.parametrize("options, needles", [
    (dict(resume="run", init_from="run"), ("give either --resume or --init-from, not both",)),
    (dict(strict_vocab=True), ("--strict-vocab applies only with --init-from",)),
    (dict(steps=0), ("--steps must be positive",)),
    (dict(minutes=-1.0), ("--minutes must be positive",)),
    (dict(sample_length=-1), ("--sample-length must be 0 or positive",)),
    (dict(checkpoint_every=-2), ("--checkpoint-every must be 0 (off) or positive",)),
    (dict(cell="esn", hidden=8, dropout=0.1), ("--dropout, --hidden do not apply to --cell esn", "--units")),
    (dict(cell="gru", units=10, leak=0.5), ("--leak, --units apply only to --cell esn",)),
])
def test_contradictory_options_are_refused(options, needles):
    refused(*needles, **options)


def test_esn_options_given_at_their_defaults_are_still_refused_on_other_cells():
    """Given means passed, whatever the value: the caller asked for something that cannot apply."""
    refused("--units apply only to --cell esn", units=1000)


def test_resume_refuses_a_corpus_or_validation_file(trained):
    refused("--resume continues with the run's own data; drop the CORPUS / --val arguments", resume=trained)
    refused("drop the CORPUS", corpus=None, resume=trained, val=TINY)


@pytest.mark.parametrize("name, value, needle", [
    ("cell", "gru", "--cell gru contradicts the checkpoint (--cell lstm)"),
    ("hidden", 16, "--hidden 16 contradicts the checkpoint (--hidden 8)"),
    ("seq_len", 16, "--seq-len 16 contradicts the checkpoint (--seq-len 8)"),
    ("lr", 0.1, "--lr 0.1 contradicts the checkpoint"),
    ("level", "word", "--level word contradicts the checkpoint (--level char)")])
def test_resume_refuses_an_option_contradicting_the_checkpoint_by_name(trained, name, value, needle):
    msg = refused(needle, corpus=None, resume=trained, **{name: value})
    assert "--resume takes the architecture, data and optimizer settings" in msg
    assert msg.endswith("drop --" + name.replace("_", "-"))


def test_resume_accepts_options_that_agree_and_continues_in_the_run_directory(trained):
    p = run.plan(None, resume=trained, steps=2, hidden=8, seq_len=8, out=trained)
    assert p.resume is not None and p.resume.step == 3
    assert p.run_dir == trained and p.source is None and p.corpus_name == "tiny.txt"
    assert p.train.steps == 2


def test_out_contradicting_resume_is_refused(trained, tmp_path):
    refused(f"--out {tmp_path / 'elsewhere'} contradicts --resume", f"{trained}: drop --out",
            corpus=None, resume=trained, out=tmp_path / "elsewhere")


def test_init_from_refuses_a_contradicting_architecture_but_not_run_settings(trained):
    msg = refused("--cell gru contradicts the checkpoint (--cell lstm)", "--init-from", cell="gru", init_from=trained)
    assert "optimizer settings" not in msg
    p = run.plan(TINY, init_from=trained, lr=0.1, seq_len=16, out="x")   # free with --init-from
    assert p.init_from is not None and p.train.lr == 0.1 and p.train.seq_len == 16


def test_resume_from_nothing(tmp_path):
    refused("nothing to resume", "nowhere", corpus=None, resume=tmp_path / "nowhere")
    refused("no latest.npz", corpus=None, resume=tmp_path)


def test_resuming_an_older_best_npz_would_overwrite_a_newer_latest(tmp_path):
    with compute_threads(1):
        train_tiny(tmp_path / "run", steps=4)
        train_tiny(tmp_path / "older", steps=2)
    best = tmp_path / "run" / "best.npz"
    best.write_bytes((tmp_path / "older" / "latest.npz").read_bytes())
    with pytest.raises(CharlmError) as e:
        run._latest_of(best)
    msg = str(e.value)
    assert "(step 2) would overwrite" in msg and "(step 4)" in msg and "--init-from" in msg
    assert run._latest_of(tmp_path / "run") == str(tmp_path / "run" / "latest.npz")
    assert run._latest_of(tmp_path / "older" / "best.npz") == str(tmp_path / "older" / "best.npz")


def test_refuse_contradictions_checks_only_the_options_given(trained):
    ck = checkpoint.load(trained / "latest.npz")
    values = {**run.DEFAULTS, "hidden": 8, "cell": "gru"}
    run.refuse_contradictions({"hidden"}, values, ck, "--resume")          # agrees
    run.refuse_contradictions(set(), values, ck, "--resume")               # cell differs but was not given
    with pytest.raises(CharlmError, match="--cell gru contradicts"):
        run.refuse_contradictions({"cell"}, values, ck, "--resume")


def test_train_runs_a_tiny_model_to_done(tmp_path):
    out = tmp_path / "run"
    with compute_threads(1):
        events = list(run.train(str(TINY), steps=3, hidden=8, layers=1, embed=4, seq_len=8, batch=2, eval_every=2,
                                sample_length=0, out=str(out)))
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "done" and kinds.count("step") == 3 and kinds.count("eval") == 2
    done = events[-1]
    assert done["steps"] == 3 and done["reason"] == "budget" and done["run_dir"] == str(out)
    assert os.path.isfile(done["checkpoint"]) and os.path.isfile(done["latest"])
    ck = checkpoint.load(done["latest"])
    assert ck.step == 3 and ck.model.hidden == 8 and ck.corpus == "tiny.txt"


def test_train_stops_when_asked_and_resumes(tmp_path):
    out = tmp_path / "run"
    with compute_threads(1):
        events = list(run.train(TINY, **SMALL, steps=50, sample_length=0, out=out, should_stop=lambda: True))
        assert events[-1]["reason"] == "interrupted" and events[-1]["steps"] == 0
        more = list(run.train(resume=out, steps=2, sample_length=0))
    assert more[-1]["steps"] == 2 and more[-1]["run_dir"] == str(out)
