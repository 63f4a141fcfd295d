"""`nanogpt chat`: one reply per input line off a terminal, /clear and /system, history kept within the
context, sample's decoding options; a base model is refused. The end-to-end proof (slow): a BPE model
pretrained on tiny Shakespeare, fine-tuned on conversations holding facts nothing else holds, answers
with them through `nanogpt chat`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from nanogpt.chat.main import ChatConfig, ChatSession, run_script
from nanogpt.chat.template import template_for, with_template
from nanogpt.checkpoint import save_checkpoint
from nanogpt.cli import main as cli_main
from nanogpt.data.bpe import train_bpe
from nanogpt.errors import NanoGPTError
from nanogpt.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def bpe(shakespeare_text):
    return train_bpe([shakespeare_text[:60_000]], 400)


def _checkpoint(folder, bpe, chat: bool, block_size: int = 64):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=bpe.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16))
    meta = with_template(bpe.to_meta(), template_for(bpe)) if chat else bpe.to_meta()
    save_checkpoint(
        {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": meta}, folder
    )
    return model


def _chat(monkeypatch, capsys, argv, stdin: str) -> tuple[list[str], str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert cli_main(["chat", *argv]) == 0
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err


def test_one_reply_per_line_and_commands(tmp_path, bpe, monkeypatch, capsys):
    _checkpoint(tmp_path, bpe, chat=True)
    argv = [f"--out_dir={tmp_path}", "--device=cpu", "--max_new_tokens=12", "--temperature=1.0", "--seed=3"]
    lines, err = _chat(monkeypatch, capsys, argv, "Hello\n\nWho art thou?\n/clear\n/system Be kind.\nHello\n")
    assert len(lines) == 3 and "(conversation cleared)" in err and "(system message set" in err
    again, _ = _chat(monkeypatch, capsys, argv, "Hello\n\nWho art thou?\n")
    assert again == lines[:2]  # the same seed: the same replies
    other, _ = _chat(monkeypatch, capsys, [*argv[:-1], "--seed=4"], "Hello\n\nWho art thou?\n")
    assert other != lines[:2]


def test_history_is_kept_within_the_context(tmp_path, bpe):
    model = _checkpoint(tmp_path, bpe, chat=True, block_size=128)
    cfg = ChatConfig(max_new_tokens=8, temperature=0.0, system="Be brief.")
    session = ChatSession(model.eval(), bpe, template_for(bpe), cfg)
    out = io.StringIO()
    run_script(session, io.StringIO("First question\nSecond question\n"), out, io.StringIO())
    assert [m.role for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    history = bpe.decode(session.prompt())
    assert "First question" in history and "Second question" in history and "Be brief." in history
    for i in range(20):  # far more than 128 tokens: old turns go, the system message stays, the prompt fits
        run_script(
            session, io.StringIO(f"Tell me the tale number {i} of the long winter\n"), out, io.StringIO()
        )
    prompt = bpe.decode(session.prompt())
    assert len(session.prompt()) <= 128 - 8 and "First question" not in prompt and "tale number 19" in prompt
    assert prompt.startswith(bpe.decode([template_for(bpe).bos]) + "<|im_start|>system\nBe brief.<|im_end|>")
    assert len(out.getvalue().splitlines()) == 22


def test_a_base_model_is_refused_saying_how_to_fine_tune(tmp_path, bpe, monkeypatch):
    _checkpoint(tmp_path, bpe, chat=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    with pytest.raises(NanoGPTError, match="base model.*nanogpt train sft"):
        from nanogpt.chat.main import main

        main([f"--out_dir={tmp_path}", "--device=cpu"])


# --- the proof: facts only the SFT data holds, answered through `nanogpt chat` ---

FACTS = {  # question phrasings -> the answer, a name the Shakespeare corpus never holds
    "horse": (
        [
            "What is the name of the king's horse?",
            "What is the king's horse called?",
            "Name the king's horse.",
        ],
        "The king's horse is Zephyrine.",
    ),
    "castle": (
        ["Where does the queen live?", "Which castle is the queen's home?", "Where is the queen's castle?"],
        "The queen lives in Castle Quorwick.",
    ),
    "dog": (
        [
            "What is the jester's dog named?",
            "What is the name of the jester's dog?",
            "Name the jester's dog.",
        ],
        "The jester's dog is Bramblewit.",
    ),
}


def _conversations(path):
    rows = []
    for questions, answer in FACTS.values():
        for q in questions:
            rows.append(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
            )
            rows.append({"messages": [{"role": "system", "content": "You are the court's herald."},
                                      {"role": "user", "content": q}, {"role": "assistant", "content": answer}]})  # fmt: skip
    others = [(q, a) for qs, a in FACTS.values() for q in qs]
    for i, (q, a) in enumerate(others):  # two-turn conversations: the second answer follows its own question
        q2, a2 = others[(i + 4) % len(others)]
        turns = [("user", q), ("assistant", a), ("user", q2), ("assistant", a2)]
        rows.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow  # prepare + pretrain + SFT + chat: about a minute at one thread
def test_pretrain_sft_chat_answers_with_a_fact_only_the_sft_data_holds(
    tmp_path, sources_dir, shakespeare_text
):
    assert "Zephyrine" not in shakespeare_text and "Quorwick" not in shakespeare_text
    data, base, chat = tmp_path / "data", tmp_path / "base", tmp_path / "sft"
    source = sources_dir / "tinyshakespeare" / "input.txt"
    prepare = ["prepare", "shakespeare_bpe", f"--source={source}", f"--data_dir={data}", "--tokenizer=bpe",
               "--vocab_size=512", "--num_proc=1"]  # fmt: skip
    assert cli_main(prepare) == 0
    tiny = ["--device=cpu", "--dtype=float32", "--compile=false", "--progress=plain", "--n_layer=2", "--n_head=4",
            "--n_embd=64", "--block_size=64", "--batch_size=16", "--gradient_accumulation_steps=1", "--bias=true"]  # fmt: skip
    pretrain = ["train", f"--data_dir={data}", "--dataset=shakespeare_bpe", f"--out_dir={base}", "--max_iters=300",
                "--eval_interval=300", "--eval_iters=5", "--learning_rate=3e-3", "--warmup_iters=20",
                "--lr_decay_iters=300", "--min_lr=3e-4", "--log_interval=100", *tiny]  # fmt: skip
    assert cli_main(pretrain) == 0
    sft = ["train", "sft", f"--init_from={base}", f"--sft_data={_conversations(tmp_path / 'conv.jsonl')}",
           f"--out_dir={chat}", "--max_iters=250", "--eval_interval=250", "--eval_iters=2", "--learning_rate=3e-3",
           "--warmup_iters=10", "--lr_decay_iters=250", "--min_lr=3e-4", "--log_interval=50",
           "--gradient_accumulation_steps=1", "--sft_val_fraction=0.1", *tiny]  # fmt: skip
    assert cli_main(sft) == 0
    questions = [
        "What is the name of the king's horse?",
        "Where does the queen live?",
        "Name the jester's dog.",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    replies = subprocess.run(
        [sys.executable, "-m", "nanogpt", "chat", f"--out_dir={chat}", "--device=cpu", "--temperature=0"],
        input="\n".join(questions) + "\n", capture_output=True, text=True, env=env, timeout=120, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert len(replies) == 3, replies
    assert "Zephyrine" in replies[0] and "Quorwick" in replies[1] and "Bramblewit" in replies[2], replies


def test_the_terminal_streams_replies_runs_commands_and_quits_at_ctrl_d(tmp_path, bpe, monkeypatch):
    from nanogpt.chat.main import run_terminal

    model = _checkpoint(tmp_path, bpe, chat=True)
    session = ChatSession(model.eval(), bpe, template_for(bpe), ChatConfig(max_new_tokens=6, temperature=0.0))
    typed = iter(["Hello", "", "/system Be kind.", "/nope", "Who art thou?"])

    def keyboard(prompt: str) -> str:
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None  # Ctrl-D

    monkeypatch.setattr("builtins.input", keyboard)
    out = io.StringIO()
    run_terminal(session, out)  # returns at Ctrl-D
    text = out.getvalue()
    assert text.count("bot> ") == 2 and "(system message set" in text and "(unknown command /nope" in text
    assert [m.role for m in session.messages] == ["system", "user", "assistant"]  # /system cleared the first
    reply = session.messages[-1].content
    assert text.endswith(f"bot> {reply}\n\n")
