"""What a first run compiles (issue 17): one signature per kernel on the float32 path, no slice
assignments in kernels, the sampler compiled beside training rather than before its first step."""
import ast
import math
from pathlib import Path

import numba
import numpy as np
import pytest

import charlm.kernels
from charlm.config import ModelConfig
from charlm.data import Vocab
from charlm.kernels import layers, lstm, sample
from charlm.lm import precompile, warmup
from charlm.lm.model import Model
from charlm.lm.sample import generate
from charlm.runtime import compute_threads

KERNELS = Path(charlm.kernels.__file__).parent


def _float32_signatures(dispatcher):
    """The float32 model's signatures (a bfloat16 sampler's, uint16 weights, are its own: test_bf16.py may
    have compiled them in this process before)."""
    dtypes = lambda s: {str(getattr(a, "dtype", "")) for a in s}
    return [s for s in dispatcher.signatures if "float32" in dtypes(s) and "uint16" not in dtypes(s)]


def _model(H=32):
    """A float32 LSTM wide enough (H >= 16) for the kernels that split by hidden units."""
    vocab = Vocab.from_text("hello, world\n")
    cfg = ModelConfig(cell="lstm", vocab_size=len(vocab), embed=8, hidden=H, layers=2)
    return Model.create(cfg, seed=0, dtype=np.float32), vocab


def _fresh(dispatcher):
    """The kernel compiled anew in this process (no cache), so the callees it compiles or loads
    show up in their .signatures whatever the on-disk cache holds."""
    return numba.njit(**{**dispatcher.targetoptions, "cache": False})(dispatcher.py_func)


def test_the_sampler_compiles_its_step_once(monkeypatch):
    # the prime's tokens (int32) and the sampled ones (int64), the first state index (the literal 0)
    # and the later ones: each difference was one more compilation of _stack_step (~2.7 s each)
    import charlm.lm.model
    monkeypatch.setattr(charlm.lm.model, "stack_sample", _fresh(sample.stack_sample))
    model, vocab = _model()
    with compute_threads(2):
        "".join(generate(model, vocab, 5, prime="hello", seed=0))
    assert len(_float32_signatures(sample._stack_step)) == 1


def test_the_parallel_parts_compile_once(rng):
    # a prange index is unsigned inside Numba's parallel body and signed outside it: passed as is,
    # every part function compiled twice
    T, N, H, V = 3, 2, 32, 5
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    hs, cs, acts, Whh = f(T + 1, N, H), f(T + 1, N, H), f(T, N, 4 * H), f(4 * H, H)
    with compute_threads(2):
        _fresh(lstm._lstm_recur_by_units)(hs, cs, acts, Whh, f(4 * H), 2)
        _fresh(lstm._lstm_backrecur_by_units)(f(N, H), f(N, H), f(T, N, 4 * H), f(T, N, H), cs, acts, Whh, 2)
        _fresh(layers.linear_backward)(f(T * N, H), f(V, H), f(V), f(T * N, V), f(T * N, H), f(V, H), 2)
    for kernel in (lstm._recur_part, lstm._backrecur_part, layers._linear_backward_part):
        assert len(_float32_signatures(kernel)) == 1, kernel


def _slice_targets(tree):
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AugAssign) else []
        for t in targets:
            if isinstance(t, ast.Subscript) and any(isinstance(n, ast.Slice) for n in ast.walk(t.slice)):
                yield node.lineno


@pytest.mark.parametrize("module", ["layers.py", "lstm.py", "parallel.py", "sample.py"])
def test_kernels_assign_no_slices(module):
    # `a[i:j] = b` (or `a[i:j] += b`) in a kernel compiles Numba's shape-mismatch message with its
    # string formatting: ~1.5 s per array rank on a first run. The pure-Python pack() is exempt.
    tree = ast.parse((KERNELS / module).read_text())
    jitted = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
              and any("njit" in ast.unparse(d) for d in f.decorator_list)]
    lines = [ln for f in jitted for ln in _slice_targets(f)]
    assert lines == [], f"{module}: slice assignments on lines {lines}"


def test_training_compiles_the_sampler_beside_its_first_steps(monkeypatch, tmp_path):
    from charlm.config import TrainConfig
    from charlm.lm.train import train
    calls = []

    class Done:
        def wait(self):
            calls.append("wait")
            return 0.0

        def stop(self):
            calls.append("stop")

    def fake(model, vocab):
        calls.append("start")
        return Done()

    monkeypatch.setattr(warmup, "sampler_in_background", fake)
    cfg = ModelConfig(cell="lstm", embed=4, hidden=8, layers=1)
    events = list(train("abcabcabd\n" * 30, cfg, TrainConfig(steps=2, batch=2, seq_len=8), tmp_path / "run",
                        sample_chars=10))
    assert calls == ["start", "wait"]  # started before the first step, joined before the first sample
    assert [e["sample"] for e in events if e["event"] == "eval"][-1]


def test_a_failing_background_job_leaves_the_parent_alone():
    job = precompile.Background(math.sqrt, -1.0)  # raises ValueError in the child
    assert job.wait() >= 0.0
    assert job.proc.exitcode not in (0, None)


def test_no_child_when_the_cache_holds_the_kernel():
    # a warm start must not pay a child's start-up to load what the parent loads in milliseconds
    out, table = np.zeros((2, 3), np.float32), np.ones((4, 3), np.float32)
    layers.embedding_forward(out, np.array([0, 3], np.int32), table)  # compiled or loaded: now in the cache
    assert precompile.cached(layers.embedding_forward, np.float32)
    assert not precompile.cached(layers.embedding_forward, np.float16)
    assert not precompile.cached(_fresh(layers.embedding_forward), np.float32)  # no cache at all


def _pretend(monkeypatch, *, safe=True, taken=False, cache=False):
    """The conditions a split looks at: a child may spawn (runtime.spawn_safe), another process holds the
    second core (runtime.cores_taken), the cache holds the kernel (precompile.cached)."""
    from charlm import runtime
    monkeypatch.setattr(runtime, "spawn_safe", lambda: safe)
    monkeypatch.setattr(runtime, "cores_taken", lambda threads, reads=3: taken)
    monkeypatch.setattr(precompile, "cached", lambda dispatcher, dtype: cache)


# ------------------------------------------------------------------ a first sample / score: the split compile
def test_the_sampler_split_compiles_the_signatures_stack_sample_calls(monkeypatch):
    # the child compiles _stack_step, the parent _decode and pick_token, each for types it is told; if
    # stack_sample called them with other types, it would compile them again and the split would gain nothing
    import charlm.lm.model
    monkeypatch.setattr(charlm.lm.model, "stack_sample", _fresh(sample.stack_sample))
    monkeypatch.setattr(precompile, "sampler_split", lambda model, precision: None)
    for precision, store in (("float32", "float32"), ("bf16", "uint16")):
        model, vocab = _model()
        with compute_threads(2):
            "".join(generate(model, vocab, 5, prime="hello", seed=0, precision=precision))
        arrays = precompile._sampler_arrays("float32", store)
        for kernel, args in ((sample._stack_step, "step"), (sample._decode, "decode"), (layers.pick_token, "pick")):
            assert precompile._signature(arrays[args]) in kernel.signatures, (precision, kernel)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_forward_split_compiles_the_signature_the_forward_calls(cell):
    import importlib
    vocab = Vocab.from_text("hello, world\n")
    model = Model.create(ModelConfig(cell=cell, vocab_size=len(vocab), embed=8, hidden=32, layers=2), seed=0,
                         dtype=np.float32)
    model._first_pass = False  # no split here: the forward below compiles its callees in this process
    module, name, args = precompile._recur_call(cell, "float32")
    model._fwd = _fresh(model._fwd)
    x = np.zeros((3, 1), np.int32)
    with compute_threads(2):
        model.token_logprobs(x, x, model.zero_state(1))
    if numba.get_num_threads() >= 2:
        kernel = getattr(importlib.import_module(f"charlm.kernels.{module}"), name)
        assert precompile._signature(args) in kernel.signatures


def test_a_first_sample_and_score_compile_in_two_processes_with_the_same_results(monkeypatch):
    """From an empty cache (here: pretended) the child compiles its kernel (or loads it: the test's cache
    is warm) and exits cleanly; the parent's results are those of a model that never split."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 threads")
    exits = []
    for cls in (precompile.SamplerSplit, precompile.ForwardSplit):
        def finish(self, _orig=cls.finish):
            _orig(self)
            exits.append((type(self).__name__, self.child.proc.exitcode))
        monkeypatch.setattr(cls, "finish", finish)
    _pretend(monkeypatch)  # (pytest's own script is guarded: spawning is safe here)
    results = []
    for split in (True, False):
        model, vocab = _model()
        model._first_pass = split
        if not split:
            monkeypatch.setattr(precompile, "sampler_split", lambda model, precision: None)
        x = np.array([[1], [2], [3]], np.int32)
        with compute_threads(2):
            text = "".join(generate(model, vocab, 20, seed=3))
            lp, _ = model.token_logprobs(x, x, model.zero_state(1))
        results.append((text, lp.tobytes()))
    assert {name for name, _ in exits} == {"SamplerSplit", "ForwardSplit"}
    assert all(code == 0 for _, code in exits), exits
    assert results[0] == results[1]


def test_no_split_on_one_thread_a_busy_machine_or_a_warm_cache(monkeypatch):
    model, _ = _model()
    _pretend(monkeypatch, cache=True)
    with compute_threads(2):
        assert precompile.sampler_split(model, "float32") is None
        assert precompile.forward_split(model) is None
    _pretend(monkeypatch)
    with compute_threads(1):
        assert precompile.sampler_split(model, "float32") is None
        assert precompile.forward_split(model) is None
    _pretend(monkeypatch, taken=True)
    with compute_threads(2):
        assert precompile.sampler_split(model, "float32") is None
        assert precompile.forward_split(model) is None


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_backward_split_compiles_the_signature_training_calls(cell):
    vocab = Vocab.from_text("hello, world\n")
    model = Model.create(ModelConfig(cell=cell, vocab_size=len(vocab), embed=8, hidden=32, layers=2,
                                     dropout=0.2), seed=0, dtype=np.float32)
    model._bwd = _fresh(model._bwd)
    x = np.zeros((3, 2), np.int32)
    with compute_threads(2):
        model.loss_and_grads(x, x, model.zero_state(2), model.zero_grads(), np.random.default_rng(0))
    assert model._bwd.signatures == [precompile._signature(precompile._backward_args("float32"))]


def test_training_warm_up_waits_for_the_backward_child_before_the_first_backward(monkeypatch, tmp_path):
    from charlm.config import TrainConfig
    from charlm.lm.train import train
    events = []
    real_backward = Model.layer_backward

    class Child:
        def wait(self):
            events.append("wait")
            return 0.0
    _pretend(monkeypatch)
    monkeypatch.setattr(precompile, "Background", lambda *a: events.append(("start", a[1:])) or Child())
    monkeypatch.setattr(Model, "layer_backward", lambda self, *a: events.append("backward") or real_backward(self, *a))
    cfg = ModelConfig(cell="lstm", embed=4, hidden=16, layers=1)
    with compute_threads(2):
        list(train("abcabcabd\n" * 30, cfg, TrainConfig(steps=1, batch=2, seq_len=8), tmp_path / "run",
                   sample_chars=0))
    if numba.config.NUMBA_NUM_THREADS >= 2:
        assert events[0] == ("start", ("charlm.kernels.lstm", "lstm_backward", "float32"))
        assert events[1:3] == ["wait", "backward"]


def test_the_backward_split_compiles_the_signature_charlm_grads_calls(monkeypatch):
    from charlm.lm import grads
    model = grads.as_float64(grads.fresh_model("lstm", 20, hidden=32, layers=2, embed=8))
    model._bwd = _fresh(model._bwd)
    monkeypatch.setattr(grads, "backward_split", lambda model: None)
    monkeypatch.setattr(grads, "as_float64", lambda m: model)  # the model holding the fresh kernel
    with compute_threads(2):
        grads.warm_up(model)
    assert model._bwd.signatures == [precompile._signature(precompile._backward_args("float64"))]


def test_no_child_where_it_would_run_the_users_script_again(monkeypatch, tmp_path):
    """A spawned child imports the parent's main script under another name: a library user's script without
    an `if __name__ == "__main__":` guard would run again in it. No child then (the parent compiles alone);
    the `charlm` command marks itself safe, and `python -m <package>` and interactive sessions are."""
    import subprocess
    import sys
    script = tmp_path / "user.py"
    script.write_text("import charlm.runtime as r\nprint(r.spawn_safe())\nr.mark_spawn_safe()\nprint(r.spawn_safe())\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
    out = subprocess.run([sys.executable, "-c", "import charlm.runtime as r; print(r.spawn_safe())"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"]
    model, vocab = _model()
    _pretend(monkeypatch, safe=False)
    with compute_threads(2):
        assert precompile.sampler_split(model, "float32") is None
        assert precompile.forward_split(model) is None
        assert precompile.backward_split(model) is None
        assert warmup.sampler_in_background(model, vocab) is None
