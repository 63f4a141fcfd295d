"""SFT vs pretraining throughput on the same model, side by side in one run: an optimizer step on packed
conversation rows (nanogpt/chat/sft.py: FastChat's 500 identity conversations, assistant-only labels) vs
one on random windows of tiny Shakespeare (nanogpt/data/loader.py), both with a BPE of 512 tokens
trained on tiny Shakespeare, the batch fetch included in each step as the trainer takes it.

    OMP_NUM_THREADS=1 python benchmarks/bench_sft.py --json benchmarks/results/sft.json

Contenders alternate (a few steps each, many rounds), so that a shared, noisy machine slows both alike;
reported: each one's median step time, tokens/s (all B x T positions), the ratio SFT / pretraining, and
SFT's row fill (positions holding conversation tokens) and trained (assistant) tokens per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nanogpt import GPT, GPTConfig
from nanogpt.chat.sft import SFTData
from nanogpt.data.loader import BatchLoader, read_meta
from nanogpt.data.prepare import prepare_dataset
from nanogpt.device import device_name
from nanogpt.files import write_text_atomic
from nanogpt.train.step import TrainStep, new_scaler

SOURCES = Path(os.environ.get("NANOGPT_DATA_SOURCES", "../shared/data"))


def make_step(model: GPT) -> TrainStep:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    params = list(model.parameters())
    return TrainStep(model, model, params, optimizer, new_scaler("cpu", "float32"), contextlib.nullcontext())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3, help="steps per contender per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_dataset(
            "shakespeare_bpe",
            SOURCES / "tinyshakespeare" / "input.txt",
            Path(tmp),
            "bpe",
            vocab_size=512,
            num_proc=1,
        )
        meta = read_meta(data)
        sft = SFTData(
            str(SOURCES / "chat" / "fastchat_dummy_conversation.json"), meta["tokenizer"], 0.05, seed=0
        )
        torch.manual_seed(0)
        config = GPTConfig(
            vocab_size=meta["vocab_size"], block_size=args.block, n_layer=4, n_head=4, n_embd=128
        )
        model = GPT(config)
        sft.pack(model, seed=0)
        loaders = {
            "pretrain": BatchLoader(data, args.batch, args.block, seed=0),
            "sft": sft.loader(args.batch, "cpu", seed=0),
        }
        step = make_step(model)
        times: dict[str, list[float]] = {name: [] for name in loaders}
        trained: list[int] = []
        for loader in loaders.values():  # warm-up
            step(lambda loader=loader: loader.get_batch("train"))
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                for _ in range(args.steps):

                    def batch(loader=loader, name=name):
                        x, y = loader.get_batch("train")
                        if name == "sft":
                            trained.append(int((y != -1).sum()))
                        return x, y

                    t0 = time.perf_counter()
                    step(batch)
                    times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.block
    result = {
        "cpu": device_name("cpu"),
        "threads": torch.get_num_threads(),
        "model": {
            "n_layer": 4,
            "n_head": 4,
            "n_embd": 128,
            "block_size": args.block,
            "vocab_size": config.vocab_size,
        },
        "batch": args.batch,
        "steps_each": len(times["sft"]),
        "sft_rows": {k: len(v[0]) for k, v in sft.rows.items()},
        "sft_fill": round(float((sft.rows["train"][0] != sft.template.bos).mean()), 4),
        "sft_trained_tokens_per_step": statistics.median(trained),
    }
    for name, ts in times.items():
        median = statistics.median(ts)
        result[name] = {"median_step_ms": round(median * 1000, 2), "tokens_per_s": round(tokens / median)}
    result["sft_over_pretrain_tokens_per_s"] = round(
        result["sft"]["tokens_per_s"] / result["pretrain"]["tokens_per_s"], 3
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        write_text_atomic(args.json, text + "\n")


if __name__ == "__main__":
    main()
