"""bAbI questions (charlm.qa.babi.Question) as padded index arrays, and the batches the
memory network (charlm.qa.model) reads: no parameters here, only word ids, lengths and ages."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .babi import answer_words


@dataclass
class Encoded:
    """Questions as padded index arrays. Q questions, M slots (oldest first, the valid
    ones 0..n_mem-1), J words per sentence, Jq per question, F supporting facts."""
    mem: np.ndarray       # (Q, M, J) word ids, 0 = padding
    mem_len: np.ndarray   # (Q, M) words per memory
    n_mem: np.ndarray     # (Q,) memories in use
    q: np.ndarray         # (Q, Jq) question word ids
    q_len: np.ndarray     # (Q,)
    ans: np.ndarray       # (Q,) answer class, -1 when the answer is not a known class
    sup: np.ndarray       # (Q, F) supporting facts as slots, in the task's order; -1 none / forgotten
    n_sup: np.ndarray     # (Q,) supporting facts given
    ans_words: np.ndarray  # (A, V) how often each word occurs in each answer class
    unknown_words: int = 0

    def __len__(self):
        return self.ans.shape[0]


def encode(questions, vocab: list[str], answers: list[str], memory_size: int) -> Encoded:
    """Index arrays for questions (charlm.qa.babi.Question). Words outside vocab become
    padding (counted in unknown_words); each question keeps its memory_size newest statements."""
    widx = {w: i for i, w in enumerate(vocab)}
    aidx = {a: i for i, a in enumerate(answers)}
    Q = len(questions)
    M = max(1, min(memory_size, max(len(q.story) for q in questions)))
    J = max(1, max(len(s) for q in questions for s in q.story[-M:]))
    Jq = max(len(q.question) for q in questions)
    F = max(1, max(len(q.support) for q in questions))
    e = Encoded(mem=np.zeros((Q, M, J), np.int32), mem_len=np.zeros((Q, M), np.int32),
                n_mem=np.zeros(Q, np.int32), q=np.zeros((Q, Jq), np.int32), q_len=np.zeros(Q, np.int32),
                ans=np.full(Q, -1, np.int32), sup=np.full((Q, F), -1, np.int32), n_sup=np.zeros(Q, np.int32),
                ans_words=answer_word_matrix(vocab, answers))
    unknown = 0
    for i, qu in enumerate(questions):
        story = qu.story[-M:]
        first = len(qu.story) - len(story)
        e.n_mem[i] = len(story)
        for m, sent in enumerate(story):
            ids = [widx.get(w, 0) for w in sent]
            unknown += ids.count(0)
            e.mem[i, m, :len(ids)] = ids
            e.mem_len[i, m] = len(ids)
        ids = [widx.get(w, 0) for w in qu.question]
        unknown += ids.count(0)
        e.q[i, :len(ids)] = ids
        e.q_len[i] = len(ids)
        e.ans[i] = aidx.get(qu.answer, -1)
        e.n_sup[i] = len(qu.support)
        for f, s in enumerate(qu.support):
            e.sup[i, f] = s - first if s >= first else -1
    e.unknown_words = unknown
    return e


def answer_word_matrix(vocab: list[str], answers: list[str]) -> np.ndarray:
    """(A, V) counts of the words of each answer class ('n,w' -> n and w); words outside vocab are left out."""
    widx = {w: i for i, w in enumerate(vocab)}
    P = np.zeros((len(answers), len(vocab)))
    for a, ans in enumerate(answers):
        for w in answer_words(ans):
            if w in widx:
                P[a, widx[w]] += 1.0
    return P


def make_batch(e: Encoded, idx: np.ndarray, hops: int, memory_size: int,
               rng: np.random.Generator | None = None, noise: float = 0.0, repeat_last: bool = False) -> dict:
    """The arrays of questions idx, trimmed to the longest story and sentence in them.

    age (N, M): 0 for the newest memory. With noise > 0 (training: random noise),
    an empty memory is inserted after each memory with probability `noise`, so
    later ages grow by one each (capped at memory_size - 1).
    target (N, K): the slot hop k should attend to (fact supervision): the k-th supporting
    fact in the task's order; -1 (unsupervised) for hops past the last fact or a fact that
    fell out of the memory window. repeat_last: hops past the last fact are supervised towards
    the last fact again (so every hop of a question with facts is supervised).
    """
    n_mem = e.n_mem[idx]
    M = int(n_mem.max())
    mem_len = e.mem_len[idx, :M]
    J = max(1, int(mem_len.max()))
    Jq = max(1, int(e.q_len[idx].max()))
    slot = np.arange(M)[None, :]
    mask = slot < n_mem[:, None]                                # (N, M)
    age = (n_mem[:, None] - 1 - slot)
    if noise > 0 and rng is not None:
        ins = (rng.random(mask.shape) < noise) & mask
        newer = np.cumsum(ins[:, ::-1], axis=1)[:, ::-1] - ins   # inserted among newer memories
        age = age + newer
    age = np.clip(np.where(mask, age, 0), 0, memory_size - 1).astype(np.int64)
    nsup = e.n_sup[idx]
    k = np.arange(hops)[None, :]
    pick = np.minimum(k, np.maximum(nsup[:, None] - 1, 0))      # hop k -> fact k
    target = np.take_along_axis(e.sup[idx], pick, axis=1)
    if not repeat_last:
        target = np.where(k < nsup[:, None], target, -1)       # hops past the last fact: free
    return dict(mem=np.ascontiguousarray(e.mem[idx, :M, :J]), mem_len=np.ascontiguousarray(mem_len),
                mask=mask, age=age, q=np.ascontiguousarray(e.q[idx, :Jq]), q_len=e.q_len[idx].copy(),
                ans=e.ans[idx].copy(), target=np.ascontiguousarray(target), ans_words=e.ans_words)
