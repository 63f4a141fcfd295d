"""GSM8K as a chat eval: the final answer after ####, exact (commas dropped); calculator marks dropped
for SFT data; bad files named; a session's score counted question by question."""

from __future__ import annotations

import pytest

from nanogpt.chat.gsm8k import evaluate_gsm8k, final_answer, read_gsm8k, to_conversation
from nanogpt.errors import NanoGPTError
from nanogpt.generate import Sampling


def test_final_answer_is_the_number_after_the_marks():
    assert final_answer("so 3 + 4 = 7.\n#### 7") == "7"
    assert final_answer("#### 1,234.") == "1234" and final_answer("#### -5") == "-5"
    assert final_answer("the answer is 7") is None  # no ####: never right


def test_the_test_split_reads_and_converts(sources_dir):
    rows = read_gsm8k(sources_dir / "chat" / "gsm8k_test.jsonl")
    assert len(rows) == 1319 and final_answer(rows[0]["answer"]) == "18"
    user, assistant = to_conversation(rows[0])
    assert user.content == rows[0]["question"] and "<<" not in assistant.content
    assert assistant.content.endswith("#### 18") and "16 - 3 - 4 = 9 duck eggs" in assistant.content


def test_a_bad_row_is_named(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    with pytest.raises(NanoGPTError, match="g.jsonl line 2: not a GSM8K row"):
        read_gsm8k(path)


class Scripted:
    """A chat session whose replies are given: what evaluate_gsm8k asks of a ChatSession."""

    def __init__(self, replies):
        self.replies, self.sampling, self.cleared = iter(replies), Sampling(0.8, 200), 0

    def clear(self):
        self.cleared += 1

    def reply(self, text):
        yield from next(self.replies)


def test_the_score_counts_exact_final_answers_greedily():
    rows = [{"question": f"q{i}", "answer": f"... #### {a}"} for i, a in enumerate(["18", "3", "1000", "7"])]
    session = Scripted(["it is 18\n#### 18", "#### 4", "#### 1,000", "7"])
    result = evaluate_gsm8k(session, rows)
    assert result == {"task": "gsm8k", "n": 4, "correct": 2, "accuracy": 0.5}
    assert session.sampling.temperature == 0.0 and session.cleared == 4
