"""The library face: `import charlm` is cheap, charlm.load() / LanguageModel give the numbers the
commands print (one code path), and the README's "From Python" example runs as written."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import charlm
from charlm.errors import CharlmError
from charlm.runtime import compute_threads
from tests.helpers import TINY, failed, ok, tiny_text, train_tiny, train_tiny_words

README = Path(__file__).parent.parent / "README.md"
WORDS = TINY.parent / "words.txt"
TEXTS = ["some text", "To be, or not to be", "ZQ\u20ac x", ""]   # OOV characters, and an empty text


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("api") / "run"
    train_tiny(run, steps=3)
    return run


@pytest.fixture(scope="module")
def word_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("api") / "wrun"
    train_tiny_words(run)
    return run


@pytest.fixture(params=["char", "word"])
def run(request, char_run, word_run):
    return char_run if request.param == "char" else word_run


# ------------------------------------------------------------ import charlm
def test_import_charlm_loads_neither_numba_nor_the_cli():
    code = ("import sys, charlm; charlm.__version__; charlm.CharlmError; "
            "print(sorted(m for m in ('numba', 'typer', 'rich', 'charlm.kernels', 'charlm.cli') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=README.parent, check=True)
    assert res.stdout.strip() == "[]"


def test_the_public_names_are_imported_on_first_use():
    from charlm.lm import api, run
    assert charlm.load is api.load and charlm.LanguageModel is api.LanguageModel and charlm.train is run.train
    assert set(charlm.__all__) == {"__version__", "CharlmError", "LanguageModel", "load", "train"}
    assert set(charlm.__all__) <= set(dir(charlm))
    assert charlm.CharlmError is CharlmError
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        charlm.nope


# ------------------------------------------------------------ the same numbers as the commands
def test_score_is_what_score_json_prints(run_cli, run):
    lm = charlm.load(run)
    for text in TEXTS:
        for eos in (True, False):
            flags = [] if eos else ["--no-eos"]
            if not text and not eos:  # no factor at all: both refuse (no perplexity of 1 over 0 tokens)
                failed(run_cli("score", text, "--model", run, "--json", *flags), "nothing to score")
                with pytest.raises(charlm.CharlmError, match="nothing to score"):
                    lm.score(text, eos=eos)
                continue
            cli = json.loads(ok(run_cli("score", text, "--model", run, "--json", *flags)).stdout)
            assert lm.score(text, eos=eos) == cli, (text, eos)
    # several texts: score_many is `score --file --json`
    Path("texts.txt").write_text("".join(t + "\n" for t in TEXTS), encoding="utf-8")
    many = json.loads(ok(run_cli("score", "--file", "texts.txt", "--model", run, "--json")).stdout)
    assert lm.score_many(TEXTS) == many
    assert many["texts"][1] == lm.score(TEXTS[1])


def test_logprobs_are_the_factors_of_score(run):
    lm = charlm.load(run)
    s = lm.score("To be, or not to be")
    pairs = lm.logprobs("To be, or not to be")
    assert [(p.token, p.logprob) for p in pairs] == [(t["token"], t["logprob"]) for t in s["tokens"]]
    assert sum(lp for _, lp in pairs) == pytest.approx(s["logprob"], rel=1e-12)
    assert pairs[-1].token == ("\n" if lm.level == "char" else "<eos>")
    short, full = lm.logprobs("To be", eos=False), lm.logprobs("To be")[:-1]  # float32: equal up to rounding
    assert [t for t, _ in short] == [t for t, _ in full]
    assert [lp for _, lp in short] == pytest.approx([lp for _, lp in full], rel=1e-6)


def test_evaluate_is_what_eval_json_prints(run_cli, run):
    lm = charlm.load(run)
    corpus = TINY if lm.level == "char" else WORDS
    for streams in (1, 3):
        cli = json.loads(ok(run_cli("eval", corpus, "--model", run, "--json", "--streams", streams)).stdout)
        assert lm.evaluate(corpus, streams) == cli
        assert lm.evaluate_text(corpus.read_text(encoding="utf-8"), streams=streams) == cli
    seen = []
    r = lm.evaluate(str(corpus), progress=lambda done, total: seen.append((done, total)), details=True)
    assert seen[-1] == (r["n_tokens"], r["n_tokens"]) and r["streams"] == 1


def test_generate_with_a_seed_is_what_sample_prints(run_cli, run):
    lm = charlm.load(run)
    prime = "To be" if lm.level == "char" else "the old"
    text = lm.generate(prime=prime, length=40, temperature=1.2, seed=7)
    assert text == lm.generate(prime=prime, length=40, temperature=1.2, seed=7)
    assert text != lm.generate(prime=prime, length=40, temperature=1.2, seed=8)
    cli = ok(run_cli("sample", "--model", run, "--prime", prime, "--length", 40, "--temp", 1.2, "--seed", 7)).stdout
    assert cli == prime + text + "\n"
    assert "".join(lm.stream(prime=prime, length=40, temperature=1.2, seed=7)) == text
    greedy = lm.generate(length=30, greedy=True)
    assert greedy == lm.generate(length=30, greedy=True, seed=3)
    lm.threads = 1
    assert lm.generate(prime=prime, length=40, temperature=1.2, seed=7) == text
    if lm.level == "char":
        assert len(text) == 40


def test_a_loaded_model_packs_its_sampler_once_and_stays_exact(char_run, monkeypatch):
    """charlm.load's model keeps the sampler's packed weights between calls (per precision and thread
    split): the same text as a fresh model packing at every call, one pack per kind, and still the same
    after dynamic evaluation (which changes the weights and puts them back)."""
    import charlm.lm.model as model_mod
    packs = []
    real = model_mod.pack

    def counting(*a, **k):
        packs.append(k.get("precision", "float32"))
        return real(*a, **k)
    monkeypatch.setattr(model_mod, "pack", counting)
    lm = charlm.load(char_run, threads=1)
    texts = [lm.generate(prime="To", length=30, seed=s) for s in (1, 2, 3)]
    assert packs == ["float32"]
    assert lm.generate(prime="To", length=30, seed=1, precision="bf16") != ""
    lm.generate(prime="To", length=30, seed=2, precision="bf16")
    assert packs == ["float32", "bf16"]
    fresh = charlm.load(char_run, threads=1)
    fresh._model.sampler_cache = None  # a model without the cache packs at every call
    assert [fresh.generate(prime="To", length=30, seed=s) for s in (1, 2, 3)] == texts
    assert packs[2:] == ["float32"] * 3
    lm.evaluate_text("To be, or not to be\n" * 3, dynamic=True, dynamic_lr=0.5)
    assert lm.generate(prime="To", length=30, seed=1) == texts[0]  # the cached packing
    lm._model.sampler_cache = None
    assert lm.generate(prime="To", length=30, seed=1) == texts[0]  # packed anew: the weights are back


def test_a_model_describes_itself(char_run):
    lm = charlm.load(char_run)
    assert lm.path == str(char_run / "best.npz") and lm.step == 3 and lm.level == "char"
    assert lm.config.cell == "lstm" and lm.config.vocab_size == len(lm.vocab)
    assert "lstm" in repr(lm) and "step 3" in repr(lm)
    assert lm.oov("To\u20acbe\u20ac") == ["\u20ac", "\u20ac"]
    assert charlm.load(char_run / "latest.npz").path.endswith("latest.npz")


def test_load_without_a_path_takes_the_latest_run(char_run, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_MODELS_DIR", str(char_run.parent))
    assert charlm.load().path == str(char_run / "best.npz")
    monkeypatch.setenv("CHARLM_MODELS_DIR", str(tmp_path / "none"))
    with pytest.raises(CharlmError, match="no trained model found"):
        charlm.load()


def test_errors_are_charlm_errors_worded_for_the_library(char_run, tmp_path):
    with pytest.raises(CharlmError, match="model not found"):
        charlm.load(tmp_path / "missing.npz")
    lm = charlm.load(char_run)
    for kwargs, word in [({"length": 0}, "length"), ({"temperature": -1}, "temperature"), ({"top_k": -1}, "top_k"),
                         ({"top_p": 0}, "top_p"), ({"repetition_penalty": 0}, "repetition_penalty")]:
        with pytest.raises(CharlmError, match=f"^{word} must be"):
            lm.stream(**kwargs)  # checked at the call, not at the first chunk
    with pytest.raises(CharlmError, match="threads"):
        charlm.load(char_run, threads=0)
    with pytest.raises(CharlmError, match="streams"):
        lm.evaluate_text("abc", streams=0)
    with pytest.raises(CharlmError, match="nothing to evaluate: the text is empty"):
        lm.evaluate_text("")
    with pytest.raises(CharlmError, match="list of texts"):
        lm.score_many("one text")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CharlmError, match="empty.txt is empty"):
        lm.evaluate(tmp_path / "empty.txt")


def test_the_command_line_keeps_its_flag_names_in_errors(run_cli, char_run):
    failed(run_cli("sample", "--model", char_run, "--length", 0), "--length must be positive")
    failed(run_cli("score", "hi", "--model", char_run, "--threads", 0), "--threads must be positive")
    failed(run_cli("eval", TINY, "--model", char_run, "--streams", 0), "--streams must be positive")


# ------------------------------------------------------------ the README
def readme_example() -> str:
    """The python code block under the README's "## From Python" heading."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "no python block in the README's From Python section"
    return m.group(1)


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys, run_cli):
    code = readme_example()
    for name in ("charlm.train(", "charlm.load(", ".generate(", ".score(", ".logprobs(", ".evaluate("):
        assert name in code, name
    monkeypatch.chdir(tmp_path)
    Path("input.txt").write_text(tiny_text() * 8, encoding="utf-8")
    Path("test.txt").write_text(tiny_text(), encoding="utf-8")
    names: dict = {}
    with compute_threads(1):  # training on every core of a machine busy with other tests waits at each step
        exec(compile(code, "README.md (From Python)", "exec"), names)
    printed = capsys.readouterr().out
    assert "best checkpoint: models/run/best.npz" in printed and "validation" in printed
    assert (tmp_path / "models" / "run" / "best.npz").is_file()
    # what the example says it gives is what the commands print
    score = json.loads(ok(run_cli("score", "To be, or not to be", "--model", "models/run", "--json")).stdout)
    assert names["s"] == score
    sample = ok(run_cli("sample", "--model", "models/run", "--prime", "ROMEO:", "--length", 200, "--seed", 1)).stdout
    assert sample == "ROMEO:" + names["text"] + "\n"
    evaluated = json.loads(ok(run_cli("eval", "test.txt", "--model", "models/run", "--json")).stdout)
    assert f"{evaluated['bits_per_token']}\n" in printed
