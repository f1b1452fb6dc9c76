"""The thread governor (charlm.runtime.Governor): how many threads run the kernels' parts, chosen by
measured speed so that a core taken by another process does not stall every barrier.

The policy is tested on a simulated machine (a fake clock whose time per piece depends on the thread
count and on whether a "hog" holds a core): it keeps every thread when they are faster, moves to one
within a few pieces when a core gets busy, comes back when it is free again, and spends little on its
probes. The numbers are tested on the real kernels: with the parts fixed, one thread and two give the
same loss, gradients, log-probabilities and samples bit for bit (LSTM, GRU, RNN, ESN, adaptive
softmax), so the governor's choices never change a result."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.lm.models import create_model
from charlm.lm.sample import Decoding, sample_one
from charlm.runtime import Governor, ThreadChoice, compute_threads, governor, parts
from charlm.data import Vocab


class Machine:
    """Seconds per piece on n threads: `fast` idle, and with a hog on a core the n-thread pieces
    stall (`stalled`) while one thread keeps its speed."""

    def __init__(self, idle: dict, loaded: dict, shows_hog: bool = False):
        self.idle, self.loaded = idle, loaded
        self.hog = False
        self.shows_hog = shows_hog  # whether the hog is seen at the start (runtime.cores_taken)
        self.asked = 0
        self.t = 0.0
        self.threads = None
        self.used = {1: 0, 2: 0}

    def clock(self) -> float:
        return self.t

    def set_threads(self, n: int) -> None:
        self.threads = n

    def busy(self, threads: int) -> bool:
        self.asked += 1
        return self.hog and self.shows_hog

    def piece(self, gov: Governor) -> int:
        with gov.run(1):
            n = self.threads
            self.used[n] += 1
            self.t += (self.loaded if self.hog else self.idle)[n]
        return n


    def piece_of(self, gov: Governor, kind, cost: dict) -> int:
        with gov.run(1, kind):
            n = self.threads
            self.t += cost[n]
        return n


def pieces(m: Machine, gov: Governor, k: int) -> list[int]:
    return [m.piece(gov) for _ in range(k)]


def test_governor_keeps_two_threads_when_they_are_faster_and_probes_little():
    m = Machine(idle={2: 0.05, 1: 0.09}, loaded={2: 0.4, 1: 0.09})
    gov = ThreadChoice(2, clock=m.clock, set_threads=m.set_threads, busy=m.busy)
    used = pieces(m, gov, 2000)  # 100 simulated seconds
    assert gov.current == 2 and gov.switches == 0
    assert used.count(1) <= 0.03 * len(used), used.count(1)  # probes: backed off to one a minute


def test_governor_moves_to_one_thread_when_a_core_gets_busy_and_back_when_it_is_free():
    m = Machine(idle={2: 0.05, 1: 0.09}, loaded={2: 0.4, 1: 0.09})
    gov = ThreadChoice(2, clock=m.clock, set_threads=m.set_threads, busy=m.busy)
    pieces(m, gov, 2000)
    m.hog = True
    t0 = m.t
    used = pieces(m, gov, 200)
    assert gov.current == 1
    assert used.index(1) <= 4 and used[10:].count(2) <= 3, used[:20]  # moved at once; few stalled probes after
    assert m.t - t0 < 1.15 * 200 * 0.09  # within 15 % of one thread's time all along
    m.hog = False
    used = pieces(m, gov, 3000)
    assert gov.current == 2 and used[-100:].count(2) >= 97  # found the free core again (a probe within 60 s)


def test_governor_chooses_one_thread_when_one_is_simply_faster():
    """A batch-1 step of a small model: the barrier costs more than the second thread brings."""
    m = Machine(idle={2: 0.002, 1: 0.0015}, loaded={2: 0.01, 1: 0.0015})
    gov = ThreadChoice(2, clock=m.clock, set_threads=m.set_threads, busy=m.busy)
    used = pieces(m, gov, 5000)
    assert gov.current == 1 and used[-1000:].count(1) >= 990


def test_each_kind_of_work_gets_its_own_choice():
    """Batch-1 sampling may be best on one thread while training steps are best on two, in the same
    process; and a kind's speed never blurs another's (their costs per unit differ a hundredfold)."""
    m = Machine(idle={2: 0.05, 1: 0.09}, loaded={2: 0.4, 1: 0.09})
    token = {2: 0.0004, 1: 0.0003}
    gov = Governor(2, clock=m.clock, set_threads=m.set_threads, busy=m.busy)
    for _ in range(300):
        m.piece_of(gov, "train", m.idle)
        for _ in range(5):
            m.piece_of(gov, "sample", token)
    assert gov.choice("train").current == 2 and gov.choice("sample").current == 1
    assert gov.choice("train").switches == 0


def test_no_governing_with_one_part_or_when_turned_off():
    m = Machine(idle={2: 0.05, 1: 0.09}, loaded={2: 0.4, 1: 0.09})
    m.threads = 2
    off = ThreadChoice(2, adaptive=False, clock=m.clock, set_threads=m.set_threads, busy=m.busy)
    assert set(pieces(m, off, 50)) == {2}
    one = ThreadChoice(1, clock=m.clock, set_threads=m.set_threads, busy=m.busy)
    m.threads = 1
    assert set(pieces(m, one, 50)) == {1}


def test_nested_pieces_are_timed_once_by_the_outer_one():
    m = Machine(idle={2: 0.05, 1: 0.09}, loaded={2: 0.4, 1: 0.09})
    gov = ThreadChoice(2, clock=m.clock, set_threads=m.set_threads, busy=m.busy)
    with gov.run(1):
        with gov.run(1):
            m.t += 1.0
    assert gov.pieces == 1


def test_compute_threads_fixes_the_parts_and_restores_the_outer_governor(monkeypatch):
    monkeypatch.delenv("CHARLM_ADAPTIVE_THREADS", raising=False)
    with compute_threads(2):
        outer = governor()
        assert parts() == 2 and outer.adaptive == (numba.config.NUMBA_NUM_THREADS >= 2)
        with compute_threads(1):
            assert parts() == 1 and not governor().adaptive
        assert governor() is outer
    monkeypatch.setenv("CHARLM_ADAPTIVE_THREADS", "0")
    with compute_threads(2):
        assert not governor().adaptive


# ------------------------------------------------------------------ the numbers do not depend on it
needs_two = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")

CASES = {
    "lstm": ModelConfig(cell="lstm", vocab_size=40, embed=16, hidden=64, layers=2, dropout=0.3),
    "gru": ModelConfig(cell="gru", vocab_size=40, embed=16, hidden=64, layers=2),
    "rnn": ModelConfig(cell="rnn", vocab_size=40, embed=16, hidden=64, layers=1),
    "esn": ModelConfig(cell="esn", vocab_size=40, hidden=96, layers=1, connectivity=0.1),
    "adaptive": ModelConfig(cell="lstm", vocab_size=300, embed=32, hidden=64, layers=1, softmax="adaptive",
                            cutoffs=(50, 150)),
}


def _vocab(V: int) -> Vocab:
    return Vocab(tuple(["\n"] + [chr(0x100 + i) for i in range(V - 1)]))


def _everything(model, vocab, rng_seed: int = 3) -> list[np.ndarray]:
    """Loss and gradients of a training window (dropout drawn from a seeded generator), log-probabilities
    of a window of 4 streams and of one, and a sample of 40 tokens."""
    V = model.cfg.vocab_size
    rng = np.random.default_rng(rng_seed)
    x = rng.integers(0, V, size=(12, 4)).astype(np.int32)
    y = rng.integers(0, V, size=(12, 4)).astype(np.int32)
    grads = model.zero_grads()
    loss, _ = model.loss_and_grads(x, y, model.zero_state(4), grads, np.random.default_rng(7))
    lp4, _ = model.token_logprobs(x, y, model.zero_state(4))
    lp1, _ = model.token_logprobs(x[:, :1], y[:, :1], model.zero_state(1))
    sample = sample_one(model, vocab, 40, Decoding(temperature=0.9), seed=5)
    return [np.float64(loss), *[grads[k] for k in sorted(grads)], lp4, lp1, np.asarray(sample["ids"]),
            np.float64(sample["logprob"])]


@needs_two
@pytest.mark.parametrize("name", list(CASES))
def test_one_thread_or_two_give_the_same_numbers_with_the_parts_fixed(name):
    cfg = CASES[name]
    model = create_model(cfg, seed=1)
    vocab = _vocab(cfg.vocab_size)
    with compute_threads(2):
        gov = governor()
        gov.adaptive = False  # hold the thread count where the test puts it
        numba.set_num_threads(2)
        two = _everything(model, vocab)
        numba.set_num_threads(1)
        one = _everything(model, vocab)
    for a, b in zip(two, one):
        assert a.tobytes() == b.tobytes()


@needs_two
def test_the_governor_in_use_does_not_change_a_training_run(tmp_path, monkeypatch):
    """Whatever thread counts the governor picks along the way, the run is the one with its parts."""
    from charlm.config import TrainConfig
    from charlm.lm import checkpoint
    from charlm.lm import train as train_mod
    from tests.helpers import tiny_text
    cfg = ModelConfig(cell="lstm", embed=16, hidden=64, layers=2, dropout=0.2)
    tcfg = TrainConfig(seq_len=16, batch=4, steps=30, eval_every=10)
    results = []
    for adaptive, probe in (("0", None), ("1", 0.0)):
        monkeypatch.setenv("CHARLM_ADAPTIVE_THREADS", adaptive)
        if probe is not None:  # probe at every chance: many switches of the thread count
            monkeypatch.setattr(ThreadChoice, "FIRST_PROBE", probe)
            monkeypatch.setattr(ThreadChoice, "MAX_INTERVAL", probe)
            monkeypatch.setattr(ThreadChoice, "AFTER_SWITCH", probe)
        with compute_threads(2):
            list(train_mod.train(tiny_text(), cfg, tcfg, tmp_path / adaptive, sample_chars=0))
        results.append(checkpoint.load(tmp_path / adaptive / "latest.npz"))
    a, b = results
    for k in a.params:
        assert a.params[k].tobytes() == b.params[k].tobytes(), k


def test_the_done_event_reports_the_threads(tmp_path):
    from charlm.config import TrainConfig
    from charlm.lm import train as train_mod
    from tests.helpers import tiny_text
    cfg = ModelConfig(cell="gru", embed=8, hidden=16, layers=1)
    with compute_threads(1):
        done = list(train_mod.train(tiny_text(), cfg, TrainConfig(seq_len=8, batch=2, steps=3), tmp_path / "r",
                                    sample_chars=0))[-1]
    assert done["threads"] == {"parts": 1, "adaptive": False, "kinds": {}}
    with compute_threads(2):
        done = list(train_mod.train(tiny_text(), cfg, TrainConfig(seq_len=8, batch=2, steps=3), tmp_path / "s",
                                    sample_chars=0))[-1]
    if numba.config.NUMBA_NUM_THREADS >= 2:
        assert done["threads"]["parts"] == 2 and done["threads"]["kinds"]["train/2"]["threads"] in (1, 2)


def test_each_python_thread_has_its_own_governor():
    import threading
    seen = {}

    def other():
        with compute_threads(1):
            seen["inner"] = parts()
        seen["after"] = governor()
    with compute_threads(2):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert parts() == 2
    assert seen == {"inner": 1, "after": None}


def test_on_a_busy_machine_a_fresh_governor_pays_for_few_stalled_pieces():
    """A command that starts next to a hog that /proc does not show (runtime.cores_taken False, e.g. it
    started just after the first piece): the first piece (not timed: it may compile) and one timed
    piece run on two threads, then the probe moves to one; later probes of two threads stop after one
    piece, since a stalled piece can cost many others."""
    m = Machine(idle={2: 0.05, 1: 0.09}, loaded={2: 0.8, 1: 0.09})
    m.hog = True
    gov = ThreadChoice(2, clock=m.clock, set_threads=m.set_threads, busy=m.busy)
    used = pieces(m, gov, 1000)  # 90 simulated seconds
    assert used[:2] == [2, 2] and gov.current == 1 and set(used[2:6]) == {1}
    later = used[6:]
    assert later.count(2) <= 6, later.count(2)  # single-piece probes at 8, 16, 32, 60 s...
    assert m.t < 1.1 * 1000 * 0.09


def test_a_hog_seen_at_the_start_costs_no_stalled_piece():
    """When /proc shows another process's runnable thread at the first piece (runtime.cores_taken), the
    work starts on one thread and stays there: the first probe of two threads comes after AFTER_SWITCH
    seconds, as after a switch, not after the first timed piece, and stops after one stalled piece. The
    check is made once per kind of work."""
    m = Machine(idle={2: 0.05, 1: 0.09}, loaded={2: 0.8, 1: 0.09}, shows_hog=True)
    m.hog = True
    gov = ThreadChoice(2, clock=m.clock, set_threads=m.set_threads, busy=m.busy)
    used = pieces(m, gov, 1000)
    first = int(ThreadChoice.AFTER_SWITCH / 0.09)  # pieces in the first AFTER_SWITCH seconds
    assert set(used[:first]) == {1} and gov.current == 1
    assert used.count(2) <= 4, used.count(2)  # single-piece probes at about 8, 16, 32, 60 s
    assert m.asked == 1


def test_a_core_busy_only_at_the_start_costs_seconds_on_one_thread():
    """A hog seen at the first piece that is gone by the next (or one at a low priority, which leaves
    two threads the faster): the first probe, after AFTER_SWITCH seconds, finds two threads faster and
    keeps them."""
    m = Machine(idle={2: 0.05, 1: 0.09}, loaded={2: 0.8, 1: 0.09}, shows_hog=True)
    m.hog = True
    gov = ThreadChoice(2, clock=m.clock, set_threads=m.set_threads, busy=m.busy)
    assert pieces(m, gov, 1) == [1]
    m.hog = False
    used = pieces(m, gov, 300)
    switched = used.index(2)
    assert 0.9 * ThreadChoice.AFTER_SWITCH / 0.09 <= switched <= 1.1 * ThreadChoice.AFTER_SWITCH / 0.09 + 3
    assert gov.current == 2 and set(used[switched:switched + 100]) == {2}  # the next probe: AFTER_SWITCH s on


def test_other_runnable_counts_the_runnable_threads_of_other_processes(tmp_path):
    from charlm import runtime
    (tmp_path / "loadavg").write_text("0.52 0.61 0.70 4/312 12345\n")
    tasks = tmp_path / "task"
    for tid, state in (("100", "R"), ("101", "S"), ("102", "R")):
        (tasks / tid).mkdir(parents=True)
        (tasks / tid / "stat").write_text(f"{tid} (python (x) y) {state} 1 2 3 4\n")
    assert runtime.other_runnable(str(tmp_path / "loadavg"), str(tasks)) == 2  # 4 runnable, 2 of them ours
    (tmp_path / "loadavg").write_text("0.52 0.61 0.70 1/312 12345\n")
    assert runtime.other_runnable(str(tmp_path / "loadavg"), str(tasks)) == 0  # never below zero
    assert runtime.other_runnable(str(tmp_path / "none"), str(tasks)) is None
    (tmp_path / "loadavg").write_text("garbage\n")
    assert runtime.other_runnable(str(tmp_path / "loadavg"), str(tasks)) is None


@pytest.mark.parametrize("others,cpus,threads,taken", [([0, 0, 0], 2, 2, False), ([1, 1, 1], 2, 2, True),
                                                     ([1, 0, 1], 2, 2, False), ([1, 1, 1], 8, 2, False),
                                                     ([7, 7, 7], 8, 2, True), ([None], 2, 2, False)])
def test_cores_taken_needs_every_read_to_show_the_others(monkeypatch, others, cpus, threads, taken):
    from charlm import runtime
    reads = iter(others)
    monkeypatch.setattr(runtime, "other_runnable", lambda: next(reads))
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert runtime.cores_taken(threads, reads=3, gap=0.0) is taken


def test_single_slow_pieces_on_a_noisy_host_do_not_set_off_probes():
    """A shared host makes a piece slow now and then (here one in ten, 2.5x, on either count) while two
    threads stay the faster: such lone pieces do not bring probes forward (three in a row do, or one
    that stalls, over 4x). The probes stay about as few as the schedule's (2 s doubling to 60 s; switches
    that noise still causes restart it), not one per slow piece (250-300 here when every piece over
    1.5x set one off), and the governor ends on two threads."""
    rng = np.random.default_rng(0)
    m = Machine(idle={2: 0.05, 1: 0.09}, loaded={2: 0.05, 1: 0.09})
    gov = ThreadChoice(2, clock=m.clock, set_threads=m.set_threads, busy=m.busy)
    used = []
    for _ in range(3000):  # 150 simulated seconds
        spike = 2.5 if rng.random() < 0.1 else 1.0
        with gov.run(1):
            n = m.threads
            m.t += m.idle[n] * spike
        used.append(n)
    assert gov.current == 2
    assert gov.probes <= 40, (gov.probes, gov.switches, used.count(1))


def test_probes_of_a_stalled_count_cost_a_small_share_of_long_pieces():
    """Pieces of 0.4 s that stall to 1.6 s on two threads: each lost probe costs 1.2 s, so the next waits
    at least 24 s (COST_SHARE 5 %): over five minutes the probes cost under 6 % of one thread's time."""
    m = Machine(idle={2: 0.2, 1: 0.4}, loaded={2: 1.6, 1: 0.4})
    m.hog = True
    gov = ThreadChoice(2, clock=m.clock, set_threads=m.set_threads, busy=m.busy)
    pieces(m, gov, 10)
    t0, n = m.t, 750  # 300 s on one thread
    pieces(m, gov, n)
    assert gov.current == 1 and m.t - t0 < 1.06 * n * 0.4
