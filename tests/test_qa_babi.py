"""The bAbI parser (charlm/qa/babi.py): answer formats, story boundaries, supporting ids, bad input."""
from pathlib import Path

import pytest

from charlm.errors import CharlmError
from charlm.qa import babi

BABI = Path(__file__).resolve().parents[1] / "../shared/corpora/babi/en"

TWO_STORIES = [
    "1 Mary moved to the bathroom.",
    "2 Sandra journeyed to the bedroom.",
    "3 Where is Mary? \tbathroom\t1",          # tasks 1-3, 5-14: '? ' before the TAB
    "4 Mary got the football there.",
    "5 What is Mary carrying?\tfootball\t4 1",  # supporting ids kept in the task's order
    "1 Bill went to the park.",                # a new story: ids restart at 1
    "2 Who went to the park?\tBill\t1",
]


def test_tokenize():
    assert babi.tokenize("Where is Mary? ") == ["where", "is", "mary"]
    assert babi.tokenize("Daniel went back to the hallway.") == ["daniel", "went", "back", "to", "the", "hallway"]


def test_stories_questions_and_supporting_ids():
    qs = babi.parse(TWO_STORIES, "t")
    assert len(qs) == 3
    q0, q1, q2 = qs
    assert q0.story == [["mary", "moved", "to", "the", "bathroom"], ["sandra", "journeyed", "to", "the", "bedroom"]]
    assert q0.question == ["where", "is", "mary"] and q0.answer == "bathroom" and q0.support == [0]
    # questions are not memories: the second question's story has 3 statements, not 4
    assert len(q1.story) == 3 and q1.story[2] == ["mary", "got", "the", "football", "there"]
    assert q1.support == [2, 0]                # line ids 4 and 1 -> statements 2 and 0, order kept
    assert q2.story == [["bill", "went", "to", "the", "park"]]  # nothing leaks from the first story
    assert q2.answer == "Bill" and q2.support == [0]
    assert q1.sentences[2] == "Mary got the football there."
    assert q0.line == 3 and q2.line == 7


@pytest.mark.parametrize("answer", ["apple,football", "n,w", "nothing", "Bill", "yes", "maybe", "two"])
def test_answer_formats_are_kept_as_one_class(answer):
    qs = babi.parse(["1 John went to the office.", f"2 What?\t{answer}\t1"], "t")
    assert qs[0].answer == answer
    assert babi.build_answers(qs) == [answer]


def test_answer_words_and_vocabulary():
    assert babi.answer_words("apple,football") == ["apple", "football"]
    assert babi.answer_words("Bill") == ["bill"]
    qs = babi.parse(["1 John went to the office.", "2 How?\tn,w\t1"], "t")
    vocab = babi.build_vocab(qs)
    assert vocab[0] == babi.NIL and {"n", "w", "john", "how"} <= set(vocab)


def test_question_without_supporting_ids_and_blank_lines():
    qs = babi.parse(["1 John went to the office.", "", "2 Where is John?\toffice"], "t")
    assert qs[0].support == [] and qs[0].answer == "office"


@pytest.mark.parametrize("lines, needle", [
    (["Mary moved to the bathroom."], "t:1: expected 'ID text'"),
    (["1 Mary moved.", "3 John left."], "t:2: line id 3"),
    (["2 Mary moved."], "t:1: line id 2"),
    (["1 Where is Mary?\tkitchen\t1"], "t:1: question with no story"),
    (["1 Mary moved.", "2 Where is Mary?\tkitchen\t1\textra"], "2 or 3 TAB-separated fields"),
    (["1 Mary moved.", "2 Where is Mary?\t\t1"], "the answer must be"),
    (["1 Mary moved.", "2 Where is Mary?\tthe kitchen\t1"], "the answer must be"),
    (["1 Mary moved.", "2 Where is Mary?\tkitchen\t5"], "supporting fact 5 is not an earlier statement"),
    (["1 Mary moved.", "2 Where?\tk\t1", "3 Where?\tk\t2"], "supporting fact 2 is not an earlier statement"),
    (["1 Mary moved.", "2 Where is Mary?\tkitchen\tone"], "must be numbers"),
    (["1 ..."], "no words"),
    (["1 Mary moved."], "no questions found"),
])
def test_malformed_input_is_a_clear_error(lines, needle):
    with pytest.raises(CharlmError) as e:
        babi.parse(lines, "t")
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_read_errors(tmp_path):
    with pytest.raises(CharlmError, match="file not found"):
        babi.read(str(tmp_path / "nope.txt"))
    with pytest.raises(CharlmError, match="is a directory"):
        babi.read(str(tmp_path))
    (tmp_path / "bin.txt").write_bytes(b"1 \xff\xfe\n")
    with pytest.raises(CharlmError, match="not valid utf-8: bad byte 0xff at offset 2"):
        babi.read(str(tmp_path / "bin.txt"))


def test_split_story():
    assert babi.split_story("Mary went home. John left!\n3 Sandra moved to the garden.") == [
        "Mary went home", "John left", "Sandra moved to the garden"]
    assert babi.split_story(" . ") == []


def test_parse_tasks():
    assert babi.parse_tasks("1-3,7, 9") == [1, 2, 3, 7, 9]
    assert babi.parse_tasks("20") == [20]
    for bad in ("x", "3-1", "0", "1-"):
        with pytest.raises(CharlmError, match="--tasks"):
            babi.parse_tasks(bad)


def test_task_files(tmp_path):
    for name in ("qa1_single_train.txt", "qa1_single_test.txt", "qa12_conj_train.txt", "notes.txt"):
        (tmp_path / name).write_text("1 a.\n")
    t = babi.task_files(str(tmp_path))
    assert sorted(t) == [1, 12] and t[1]["name"] == "single" and "test" not in t[12]
    with pytest.raises(CharlmError, match="no bAbI files"):
        babi.task_files(str(tmp_path / ".."))
    with pytest.raises(CharlmError, match="not a folder"):
        babi.task_files(str(tmp_path / "none"))


@pytest.mark.skipif(not BABI.is_dir(), reason=f"bAbI corpus not found at {BABI}")
def test_every_babi_file_parses():
    """The 40 files of the real corpus: 1,000 questions each; task 8 and 19 answers are comma lists."""
    files = sorted(BABI.glob("qa*_*.txt"))
    assert len(files) == 40
    for f in files:
        qs = babi.read(str(f))
        assert len(qs) == 1000, f
        assert all(q.support for q in qs)
    t19 = babi.read(str(next(BABI.glob("qa19_*_train.txt"))))
    assert all(len(q.answer.split(",")) == 2 for q in t19)
    t8 = babi.read(str(next(BABI.glob("qa8_*_train.txt"))))
    assert any("," in q.answer for q in t8) and any(q.answer == "nothing" for q in t8)
