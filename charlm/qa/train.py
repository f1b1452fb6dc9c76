"""Train, evaluate and query a memory network. Functions yield events or return values; they never print."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import CharlmError
from ..optim import clip_scale, grad_norm, make_optimizer
from . import babi
from .batches import encode, make_batch
from .checkpoint import BEST, QACheckpoint, save
from .model import QAConfig, QAModel, init_params, loss_and_grads


@dataclass(frozen=True)
class QATrainConfig:
    epochs: int = 100
    minutes: float = 0.0          # 0: no time limit
    batch: int = 32
    lr: float = 0.01
    optimizer: str = "adam"
    clip: float = 40.0
    anneal_every: int = 25        # halve the learning rate every this many epochs (0: never)
    val_frac: float = 0.1
    seed: int = 0
    linear_start: int = 20        # at most this many epochs without the attention softmax (0: off)
    noise: float = 0.1            # random noise: probability of an empty memory after each memory
    supervise_facts: bool = False
    fact_weight: float = 1.0
    repeat_last_fact: bool = False  # with supervise_facts: hops past the last fact attend to it again
    runs: int = 1                 # independent runs (initialisations); the best by validation is kept

    def __post_init__(self):
        for name in ("minutes", "lr", "clip", "val_frac", "noise", "fact_weight"):  # NaN passes every comparison
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise CharlmError(f"--{name.replace('_', '-')} must be a finite number, got {str(v)[:40]}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 64:
            raise CharlmError(f"--seed must be a whole number from 0 to 2**64 - 1, got {str(self.seed)[:40]}")
        if self.epochs < 1:
            raise CharlmError(f"--epochs must be positive, got {self.epochs}")
        if self.minutes < 0:
            raise CharlmError(f"--minutes must be positive, got {self.minutes}")
        if self.batch < 1:
            raise CharlmError(f"--batch must be positive, got {self.batch}")
        if not self.lr > 0:
            raise CharlmError(f"--lr must be positive, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise CharlmError(f"--optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.clip < 0:
            raise CharlmError(f"--clip must be 0 (off) or positive, got {self.clip}")
        if not 0 <= self.val_frac < 1:
            raise CharlmError(f"--val-frac must be in [0, 1), got {self.val_frac}")
        if self.linear_start < 0:
            raise CharlmError(f"--linear-start must be 0 (off) or positive, got {self.linear_start}")
        if self.runs < 1:
            raise CharlmError(f"--runs must be positive, got {self.runs}")
        if not 0 <= self.noise < 1:
            raise CharlmError(f"--noise must be in [0, 1), got {self.noise}")

    def to_dict(self) -> dict:
        return asdict(self)


def check_memory(cfg: QAConfig, tcfg: QATrainConfig) -> None:
    """CharlmError before anything is allocated if the model cannot fit: its parameters counted from the
    configuration, times the copies training keeps (gradients, Adam's moments, the best epoch's copy)."""
    from ..runtime import machine_memory
    d, H, V, M, A = cfg.dim, cfg.gru_hidden, cfg.vocab_size, cfg.memory_size, cfg.n_answers
    per_hop = V * d + M * d + len(cfg.directions) * (3 * H * (d + H + 2))
    n = (cfg.hops + 1) * per_hop + (cfg.hops - 1) * (2 * cfg.relative + 1) * d + 2 * A * d
    n += cfg.mlp * ((cfg.hops + 1) * d + 1 + A)
    need = 4 * 6 * n + 4 * tcfg.batch * M * d * (cfg.hops + 1) * 4  # six copies; a batch's activations
    have, who = machine_memory()
    if need > have:
        raise CharlmError(f"this model needs ~{need / 2**30:.1f} GiB of memory to train; {who} {have / 2**30:.1f} "
                          f"GiB: lower --dim, --hops or --memory-size")


def preflight(questions: list, cfg: QAConfig, tcfg: QATrainConfig, out_dir: str | None) -> None:
    """train()'s checks of memory and output folder, made at once (train() is a generator: a caller showing
    progress would otherwise have started its display)."""
    cfg = QAConfig(**{**cfg.to_dict(), "vocab_size": len(babi.build_vocab(questions)),
                      "n_answers": len(babi.build_answers(questions))})
    check_memory(cfg, tcfg)
    if out_dir is not None:
        check_writable(out_dir)


def check_writable(folder: str) -> None:
    """The folder exists (made if need be) and takes a new file: CharlmError now rather than after training."""
    import tempfile
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CharlmError(f"cannot write the model into {folder}: {e.strerror or e}") from None


def _accuracy(params, cfg, enc, linear, batch=256) -> tuple[float, float]:
    """(mean answer loss, accuracy) over enc; unknown answers count as wrong (and not in the loss)."""
    correct = 0
    loss = 0.0
    for i0 in range(0, len(enc), batch):
        idx = np.arange(i0, min(len(enc), i0 + batch))
        b = make_batch(enc, idx, cfg.hops, cfg.memory_size)
        l, _, logits, _ = loss_and_grads(params, cfg, b, linear, need_grads=False)
        loss += l * len(idx)
        correct += int((logits.argmax(1) == b["ans"]).sum())
    n = max(1, len(enc))
    return loss / n, correct / n


def train(questions: list, cfg: QAConfig, tcfg: QATrainConfig, out_dir: str | None = None,
          source: str = "", should_stop: Callable[[], bool] | None = None,
          dtype=np.float32, only_runs: list[int] | None = None) -> Iterator[dict]:
    """Train on parsed bAbI questions; keep the parameters with the best validation accuracy
    (ties: lower validation loss) among the epochs with the attention softmax.

    Yields {"event": "start", ...}, one {"event": "epoch", ...} per epoch and a last
    {"event": "done", ...}; the model is saved to out_dir/best.npz when out_dir is given
    (the done event carries it as "checkpoint") and always returned in done["model"].
    only_runs: train only these of the runs 0..runs-1, each exactly as in the full series (charlm.qa.spread).
    """
    rng = np.random.default_rng(tcfg.seed)
    order = rng.permutation(len(questions))
    n_val = int(round(tcfg.val_frac * len(questions)))
    if tcfg.val_frac > 0 and len(questions) >= 2:
        n_val = min(max(n_val, 1), len(questions) - 1)
    else:
        n_val = 0
    val_q = [questions[i] for i in order[:n_val]]
    train_q = [questions[i] for i in order[n_val:]]
    vocab = babi.build_vocab(questions)
    answers = babi.build_answers(train_q)
    cfg = QAConfig(**{**cfg.to_dict(), "vocab_size": len(vocab), "n_answers": len(answers)})
    check_memory(cfg, tcfg)
    if out_dir is not None:
        check_writable(out_dir)  # before the training, not after it
    tr = encode(train_q, vocab, answers, cfg.memory_size)
    va = encode(val_q, vocab, answers, cfg.memory_size) if val_q else None
    sup = tcfg.fact_weight if tcfg.supervise_facts else 0.0
    if sup and not (tr.n_sup > 0).any():
        raise CharlmError("--supervise-facts needs supporting fact ids (the third field of question lines); "
                          "this file has none")
    yield {"event": "start", "n_train": len(train_q), "n_val": len(val_q), "vocab": len(vocab),
           "answers": len(answers), "epochs": tcfg.epochs, "runs": tcfg.runs, "config": cfg.to_dict()}
    t0 = time.perf_counter()
    best, run_best, total = None, [], 0
    for run in range(tcfg.runs) if only_runs is None else only_runs:
        budget = 60 * tcfg.minutes / tcfg.runs if tcfg.minutes else math.inf
        # the split above stays; each run draws its own initialisation, batches and noise
        run_rng = rng if run == 0 else np.random.default_rng([tcfg.seed, run])
        top, n_epochs = yield from _train_run(tr, va, cfg, tcfg, run, run_rng, sup, budget, t0, should_stop, dtype)
        run_best.append(top[0][0])
        total += n_epochs
        if best is None or top[0] > best[0]:
            best = top
        if should_stop and should_stop():
            break
    (best_acc, neg_loss), best_epoch, best_params, best_run = best
    info = {"source": source, "epochs": total, "best_epoch": best_epoch, "best_val_acc": best_acc,
            "best_run": best_run, "runs_val_acc": run_best,
            "best_val_loss": -neg_loss, "n_train": len(train_q), "n_val": len(val_q),
            "seconds": time.perf_counter() - t0, "settings": tcfg.to_dict()}
    ck = QACheckpoint(cfg, vocab, answers, best_params, info)
    path = None
    if out_dir is not None:
        path = str(Path(out_dir) / BEST)
        save(ck, path)
        ck.path = path
    yield {"event": "done", **{k: v for k, v in info.items() if k != "settings"}, "checkpoint": path,
           "model": QAModel(ck)}


def _train_run(tr, va, cfg, tcfg, run, rng, sup, budget, t0, should_stop, dtype):
    """One training run (yields its epoch events); returns ((val_acc, -val_loss), epoch, params, run)
    of its best softmax-attention epoch, and the number of epochs run."""
    params = init_params(cfg, rng, dtype)
    opt = make_optimizer(tcfg.optimizer, params)
    # linear start is for weak supervision: with fact supervision the attention is trained directly
    ls_max = 0 if sup else min(tcfg.linear_start, tcfg.epochs // 2)
    linear = ls_max > 0
    t_run = time.perf_counter()
    deadline = t_run + budget
    best = None
    best_ls_loss, ls_bad = math.inf, 0
    lr = tcfg.lr
    soft_epoch = 0
    epoch = 0
    for epoch in range(1, tcfg.epochs + 1):
        perm = rng.permutation(len(tr))
        tot, ok, seen = 0.0, 0, 0
        for i0 in range(0, len(tr), tcfg.batch):
            idx = perm[i0:i0 + tcfg.batch]
            b = make_batch(tr, idx, cfg.hops, cfg.memory_size, rng, tcfg.noise, tcfg.repeat_last_fact)
            loss, grads, logits, _ = loss_and_grads(params, cfg, b, linear, sup)
            if not math.isfinite(loss):
                raise CharlmError(f"training diverged at epoch {epoch} (loss {loss}); try a smaller --lr")
            opt.step(params, grads, lr, clip_scale(grad_norm(grads), tcfg.clip))
            tot += loss * len(idx)
            ok += int((logits.argmax(1) == b["ans"]).sum())
            seen += len(idx)
        if va is not None:
            val_loss, val_acc = _accuracy(params, cfg, va, linear)
        else:
            val_loss, val_acc = tot / seen, ok / seen
        phase = "linear" if linear else "softmax"
        if not linear:
            soft_epoch += 1
            if tcfg.anneal_every and soft_epoch % tcfg.anneal_every == 0:
                lr *= 0.5
            key = (val_acc, -val_loss)
            if best is None or key > best[0]:
                best = (key, epoch, {n: p.copy() for n, p in params.items()}, run)
        now = time.perf_counter()
        stop = bool(should_stop and should_stop())
        yield {"event": "epoch", "run": run, "epoch": epoch, "phase": phase, "train_loss": tot / seen,
               "train_acc": ok / seen, "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "seconds": now - t0}
        if linear:
            if val_loss < best_ls_loss - 1e-4:
                best_ls_loss, ls_bad = val_loss, 0
            else:
                ls_bad += 1
            if epoch >= ls_max or (ls_bad >= LS_PATIENCE and epoch >= LS_MIN) or now > t_run + budget / 2:
                linear = False       # re-insert the softmax (end of linear start)
        elif now > deadline or stop:
            break
    if best is None:  # stopped during linear start: keep the last parameters (softmax attention)
        val_loss, val_acc = _accuracy(params, cfg, va if va is not None else tr, False)
        best = ((val_acc, -val_loss), epoch, params, run)
    return best, epoch


def evaluate(model: QAModel, questions: list) -> dict:
    """Accuracy over questions; an answer outside the model's answer classes counts as an error."""
    enc = model.encode(questions)
    probs, _ = model.predict(enc)
    correct = int((probs.argmax(1) == enc.ans).sum())
    n = len(questions)
    return {"n_questions": n, "correct": correct, "accuracy": correct / n, "error_pct": 100.0 * (1 - correct / n),
            "unknown_answers": int((enc.ans < 0).sum()), "unknown_words": enc.unknown_words}


def ask(model: QAModel, sentences: list[str], question: str) -> dict:
    """Answer one question about a story; returns the answer, its probability, the top answers
    and, per hop, the attention over the memories (which sum to 1) and the selected one (s*)."""
    if not sentences:
        raise CharlmError("the story is empty: give --story \"Sentence. Sentence.\" or --story-file FILE")
    story = [babi.tokenize(s) for s in sentences]
    qwords = babi.tokenize(question)
    if not qwords:
        raise CharlmError("the question has no words")
    known = set(model.vocab[1:])
    unknown = sorted({w for s in story + [qwords] for w in s if w not in known})
    if unknown:
        raise CharlmError(f"unknown word{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown[:8]))}: "
                          f"the model knows only the {len(known)} words of its training data")
    q = babi.Question(story=story, question=qwords, answer="", sentences=sentences)
    enc = model.encode([q])
    probs, attn = model.predict(enc)
    n = int(enc.n_mem[0])
    first = len(sentences) - n
    mems = sentences[first:]
    top = np.argsort(-probs[0])[:5]
    hops = []
    for h in range(model.cfg.hops):
        w = attn[h][0, :n]
        sel = int(w.argmax())
        hops.append({"hop": h + 1, "weights": [float(x) for x in w], "selected": sel,
                     "selected_sentence": mems[sel]})
    a = int(top[0])
    return {"answer": model.answers[a], "probability": float(probs[0, a]),
            "top": [{"answer": model.answers[i], "probability": float(probs[0, i])} for i in top],
            "memories": mems, "forgotten": first, "hops": hops}


# ------------------------------------------------------------------ the 20 tasks
# Test error % with 1k training examples, Sukhbaatar et al. (2015), Table 1:
# (LSTM, MemNN strongly supervised, MemN2N PE LS RN weakly supervised)
REFERENCE = {
    1: (50, 0, 0.0), 2: (80, 0, 8.3), 3: (80, 0, 40.3), 4: (39, 0, 2.8), 5: (30, 2, 13.1),
    6: (52, 0, 7.6), 7: (51, 15, 17.3), 8: (55, 9, 10.0), 9: (36, 0, 13.2), 10: (56, 2, 15.1),
    11: (38, 0, 0.9), 12: (26, 0, 0.2), 13: (6, 0, 0.4), 14: (73, 1, 1.7), 15: (79, 0, 0.0),
    16: (77, 0, 1.3), 17: (49, 35, 51.0), 18: (48, 5, 11.1), 19: (92, 64, 82.8), 20: (9, 0, 0.0),
}
REFERENCE_MEAN = {"lstm": (51.3, 20), "memnn": (6.7, 4), "memn2n": (13.9, 11)}
FAIL_PCT = 5.0
LS_PATIENCE, LS_MIN = 5, 10


def suite(folder: str, tasks: list[int], cfg: QAConfig, tcfg: QATrainConfig, out_dir: str | None = None,
          should_stop: Callable[[], bool] | None = None,
          choices: list[tuple] | None = None) -> Iterator[dict]:
    """Train and test one model per bAbI task in folder. Checks the files at once (CharlmError),
    then returns an iterator of events: {"event": "task_start"}, the training events of each
    task (with "task"), {"event": "task", ...} results and a final {"event": "suite", ...}.

    choices: (encoder, runs) or (encoder, runs, hops) tuples; each task then trains one model per
    choice (the same training/validation split) and keeps the one with the best validation accuracy
    (ties: the lower validation loss, then the earlier choice) — model selection on held-out
    training questions only; the test file is read once, for the kept model. Default: cfg's
    encoder and hops with tcfg.runs."""
    files = babi.task_files(folder)
    missing = [t for t in tasks if t not in files or "train" not in files[t] or "test" not in files[t]]
    if missing:
        raise CharlmError(f"{folder} lacks the train/test files of task{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(map(str, missing))}")
    choices = [(c[0], c[1], c[2] if len(c) > 2 else cfg.hops) for c in (choices or [(cfg.encoder, tcfg.runs)])]
    from .. import dist
    if dist.size() > 1:  # under MPI: the tasks' runs spread over the ranks, the same table at the end
        return _spread(files, tasks, cfg, tcfg, out_dir, should_stop, choices)
    return _suite(files, tasks, cfg, tcfg, out_dir, should_stop, choices)


def _suite(files, tasks, cfg, tcfg, out_dir, should_stop, choices):
    t0 = time.perf_counter()
    rows = []
    for i, t in enumerate(tasks):
        f = files[t]
        yield {"event": "task_start", "task": t, "name": f["name"], "index": i, "n_tasks": len(tasks)}
        train_q = babi.read(f["train"])
        test_q = babi.read(f["test"])
        task_out = str(Path(out_dir) / f"qa{t}") if out_dir else None
        done, by_encoder, seconds = None, {}, 0.0
        hop_counts = {h for _, _, h in choices}
        for enc, runs, hops in choices:
            c = QAConfig(**{**cfg.to_dict(), "encoder": enc, "hops": hops})
            name = enc if len(hop_counts) == 1 else f"{enc}/{hops}"
            tc = QATrainConfig(**{**tcfg.to_dict(), "runs": runs})
            for ev in train(train_q, c, tc, None, source=f["train"], should_stop=should_stop):
                if ev["event"] == "done":
                    seconds += ev["seconds"]
                    by_encoder[name] = ev["best_val_acc"]
                    if done is None or (ev["best_val_acc"], -ev["best_val_loss"]) > \
                            (done["best_val_acc"], -done["best_val_loss"]):
                        done = ev
                yield {**ev, "task": t, "encoder": enc, "hops": hops}
            if should_stop and should_stop():
                break
        ck = done["model"].ck
        if task_out is not None:
            ck.path = str(Path(task_out) / BEST)
            save(ck, ck.path)
        row = _row(t, f["name"], evaluate(done["model"], test_q), ck, done, by_encoder, seconds)
        rows.append(row)
        yield {"event": "task", **row}
        if should_stop and should_stop():
            break
    yield _summary(rows, time.perf_counter() - t0, tcfg, choices)


def _row(t, name, r, ck, done, by_encoder, seconds) -> dict:
    """A task's line of the table: test result r of the kept model (checkpoint ck, its training's done)."""
    ref = REFERENCE.get(t)
    return {"task": t, "name": name, "test_error_pct": r["error_pct"], "n_test": r["n_questions"],
            "encoder": ck.config.encoder, "hops": ck.config.hops, "best_val_acc": done["best_val_acc"],
            "val_acc_by_encoder": by_encoder, "epochs": done["epochs"], "seconds": seconds,
            "ref_lstm": ref[0] if ref else None, "ref_memnn": ref[1] if ref else None,
            "ref_memn2n": ref[2] if ref else None}


def _summary(rows, seconds, tcfg, choices) -> dict:
    errs = [r["test_error_pct"] for r in rows]
    return {"event": "suite", "tasks": rows, "mean_error_pct": float(np.mean(errs)) if errs else None,
            "failed": sum(e > FAIL_PCT for e in errs), "n_tasks": len(rows), "seconds": seconds,
            "encoder": ",".join(dict.fromkeys(e for e, _, _ in choices)),
            "runs": [r for _, r, _ in choices], "hops": sorted({h for _, _, h in choices}),
            "supervise_facts": tcfg.supervise_facts}


def _spread(files, tasks, cfg, tcfg, out_dir, should_stop, choices):
    from .spread import spread_suite
    for ev in spread_suite(files, tasks, cfg, tcfg, out_dir, should_stop, choices, train=train, evaluate=evaluate,
                           row_of=_row):
        if ev["event"] == "rows":
            yield _summary(ev["rows"], ev["seconds"], tcfg, choices)
        else:
            yield ev
