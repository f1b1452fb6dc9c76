"""bAbI question-answering files: parse, tokenise, build vocabularies.

A file is a sequence of stories. Every line is ``ID<space>text``; the ID restarts at 1
for a new story and goes up by one per line. A line without a TAB is a statement;
a line with one is a question ``question<TAB>answer[<TAB>supporting ids]``. The
supporting ids name earlier statements of the same story, in the order the task
gives them (the order of the reasoning, e.g. "who has the ball" before "where is
that person"). Answers are kept as written, one string each: task 8's
``apple,football`` and task 19's ``n,w`` are single answer classes, as the tasks
define them.

Each question becomes a :class:`Question` holding the statements of its story
before it (questions are not memories), tokenised: lower case, letters and digits
only (``Mary.`` -> ``mary``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import CharlmError

NIL = "<nil>"  # word id 0: padding, its embedding is fixed at zero

_TOKEN = re.compile(r"[a-z0-9]+")
_LINE = re.compile(r"(\d+) (.*)")


def tokenize(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: 'Where is Mary? ' -> ['where', 'is', 'mary']."""
    return _TOKEN.findall(text.lower())


@dataclass
class Question:
    story: list[list[str]]          # statements before the question, oldest first, tokenised
    question: list[str]
    answer: str
    support: list[int] = field(default_factory=list)  # indices into story, in the file's order
    sentences: list[str] = field(default_factory=list)  # the statements as written (for display)
    line: int = 0                   # line number of the question in its file (1-based; 0 for `ask`)


def parse(lines: Iterable[str], source: str = "<input>") -> list[Question]:
    """Parse bAbI lines into questions. Any malformed line is a CharlmError naming source:line."""
    questions: list[Question] = []
    story: list[list[str]] = []
    sentences: list[str] = []
    stmt_of_id: dict[int, int] = {}   # line id -> index in story (statements only)
    prev_id = 0
    seen_any = False
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        m = _LINE.fullmatch(line)
        if m is None:
            raise CharlmError(f"{where}: expected 'ID text' (a line number, a space, the text), got {_short(line)!r}")
        lid, text = int(m.group(1)), m.group(2)
        if lid == 1:
            story, sentences, stmt_of_id = [], [], {}
        elif not seen_any or lid != prev_id + 1:
            expect = "1 (the first line of a story)" if not seen_any else f"{prev_id + 1}, or 1 to start a new story"
            raise CharlmError(f"{where}: line id {lid} where {expect} was expected")
        seen_any = True
        prev_id = lid
        if "\t" not in text:
            words = tokenize(text)
            if not words:
                raise CharlmError(f"{where}: the statement has no words")
            stmt_of_id[lid] = len(story)
            story.append(words)
            sentences.append(text.strip())
            continue
        fields = text.split("\t")
        if len(fields) not in (2, 3):
            raise CharlmError(f"{where}: a question line has 2 or 3 TAB-separated fields "
                              f"(question, answer, supporting ids), got {len(fields)}")
        qtext, answer = fields[0].strip(), fields[1].strip()
        qwords = tokenize(qtext)
        if not qwords:
            raise CharlmError(f"{where}: the question has no words")
        if not answer or any(c.isspace() for c in answer):
            raise CharlmError(f"{where}: the answer must be one non-empty string without spaces "
                              f"(lists are comma-separated: a,b), got {answer!r}")
        if not story:
            raise CharlmError(f"{where}: question with no story before it (a story's statements "
                              f"come first, numbered from 1)")
        support = []
        if len(fields) == 3 and fields[2].strip():
            for tok in fields[2].split():
                if not tok.isdigit():
                    raise CharlmError(f"{where}: supporting fact ids must be numbers, got {tok!r}")
                sid = int(tok)
                if sid not in stmt_of_id:
                    raise CharlmError(f"{where}: supporting fact {sid} is not an earlier statement of this story")
                support.append(stmt_of_id[sid])
        questions.append(Question(story=list(story), question=qwords, answer=answer, support=support,
                                  sentences=list(sentences), line=lineno))
    if not questions:
        raise CharlmError(f"{source}: no questions found (a question line is 'ID question<TAB>answer<TAB>ids')")
    return questions


def _short(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[:n] + "..."


def read(path: str) -> list[Question]:
    """Parse a bAbI file; '-' reads standard input. Read by charlm.data.read_text, so a missing
    file, a folder, a FIFO or bytes that are not UTF-8 get the same errors as a corpus."""
    from ..data import read_text
    name = "<stdin>" if path == "-" else str(path)
    return parse(read_text(str(path), what="bAbI file").splitlines(keepends=True), name)


def split_story(text: str) -> list[str]:
    """A free-text story ('Mary went home. John left.') as its sentences. Lines of a
    story file may carry bAbI-style leading line numbers; they are dropped."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*\d+\s+", "", line)
        for s in re.split(r"[.!?]+", line):
            if tokenize(s):
                out.append(s.strip())
    return out


def build_vocab(questions: list[Question]) -> list[str]:
    """Word list with NIL at 0, then every story, question and answer word of the data, sorted."""
    words = set()
    for q in questions:
        for s in q.story:
            words.update(s)
        words.update(q.question)
        words.update(answer_words(q.answer))
    return [NIL] + sorted(words)


def answer_words(answer: str) -> list[str]:
    """The words of an answer class: 'apple,football' -> ['apple', 'football'], 'Bill' -> ['bill']."""
    return tokenize(answer.replace(",", " "))


def build_answers(questions: list[Question]) -> list[str]:
    """The answer classes: every distinct answer string of the data, sorted."""
    return sorted({q.answer for q in questions})


# bAbI file names in a task folder: qa<N>_<name>_<split>.txt
_TASK_FILE = re.compile(r"qa(\d+)_(.+)_(train|test)\.txt")


def task_files(folder: str) -> dict[int, dict]:
    """{task number: {"name", "train", "test"}} for the bAbI files found in folder."""
    root = Path(folder)
    if not root.is_dir():
        raise CharlmError(f"not a folder: {root} (give the folder with qa1_..._train.txt ... qa20_..._test.txt)")
    tasks: dict[int, dict] = {}
    for p in sorted(root.iterdir()):
        m = _TASK_FILE.fullmatch(p.name)
        if m:
            t = tasks.setdefault(int(m.group(1)), {"name": m.group(2)})
            t[m.group(3)] = str(p)
    if not tasks:
        raise CharlmError(f"no bAbI files (qaN_<name>_train.txt / _test.txt) in {root}")
    return tasks


def parse_tasks(spec: str) -> list[int]:
    """'1-20', '1,3,5-7' -> sorted task numbers."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise CharlmError(f"--tasks: expected numbers and ranges like 1-20 or 1,3,5-7, got {spec!r}")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        if a > b or a < 1:
            raise CharlmError(f"--tasks: bad range {part!r}")
        out.update(range(a, b + 1))
    return sorted(out)
