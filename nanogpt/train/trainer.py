"""`nanogpt train`: the training loop, in the order of nanoGPT's train.py.

Set-up (device, precision, torchrun, data, model, optimizer, resume), then the loop: every eval_interval
estimate the loss and save a checkpoint; every iteration one optimizer step of gradient_accumulation_steps
micro-steps; every log_interval a log line. One process on a CPU, a GPU or an Apple GPU, or many under
`torchrun` (DDP, or FSDP2 with --parallel=fsdp).

    nanogpt train shakespeare_char_cpu --max_iters=500
    torchrun --standalone --nproc_per_node=8 -m nanogpt train gpt2_124m
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_optimizer_state_dict,
)

from nanogpt.chat.sft import SFTLoader, sft_data
from nanogpt.checkpoint import (
    CKPT_NAME,
    RESUME_NAME,
    discard_resume,
    load_checkpoint,
    restore_rng,
    resume_path,
    rng_state,
    save_checkpoint,
    training_checkpoint,
)
from nanogpt.data.loader import BatchLoader, check_token_ids, load_split, read_meta
from nanogpt.data.prepare import ensure_prepared
from nanogpt.data.tokenizers import tokenizer_from_meta
from nanogpt.device import DTYPES, autocast, device_type, resolve_device, resolve_dtype
from nanogpt.errors import NanoGPTError
from nanogpt.evals.report import TaskEvaluator
from nanogpt.files import folder_lock, remove_stale_temporaries, write_text_atomic
from nanogpt.from_nanogpt import is_nanogpt_checkpoint
from nanogpt.lora import lora_checkpoint
from nanogpt.options import to_dict
from nanogpt.perf import compile_options, keep_freed_memory, matmul_peak_flops, wants_compile
from nanogpt.train import distributed
from nanogpt.train.config import TrainConfig, given_keys, load_train_config, preset_names, train_help
from nanogpt.train.distributed import DistEnv
from nanogpt.train.ema import WeightEMA, restore_raw_weights
from nanogpt.train.metrics import NullLog, RunLog
from nanogpt.train.model_init import fine_tune_config, given_values, init_model, resumed_config
from nanogpt.train.optim import build_optimizer
from nanogpt.train.schedule import get_lr
from nanogpt.train.step import Batch, TrainStep, checkpoint_activations, new_scaler

# Eval batches come from a loader of their own with this seed: the same windows at every eval (smoother
# curves that compare across runs), and evaluating never shifts the training stream (exact resume).
EVAL_SEED = 1234
# optimizer and model state as one full (unsharded) dict keyed by parameter name, the same under one
# process, DDP and FSDP, so any of them resumes any other's checkpoint
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(train_help(argv))
        return 0
    cfg, given = load_train_config(argv), given_keys(argv)
    if cfg.init_from != "resume" and "dataset" not in given and not cfg.sft_data:
        raise NanoGPTError(
            "name what to train: a preset (e.g. `nanogpt train shakespeare_char_cpu`, a few CPU minutes) or "
            f"--dataset=NAME. Presets: {', '.join(preset_names())}. TrainConfig's defaults alone are GPT-2 "
            "124M on OpenWebText: `nanogpt train gpt2_124m`"
        )
    result = train(cfg, given)
    # stopped by a signal (saved, resumable): the shell's code for it, so `train && next` does not go on
    return 128 + signal.Signals[result["stopped_by"]].value if result["stopped_by"] else 0


def train(cfg: TrainConfig, given: set[str] | None = None) -> dict[str, Any]:
    """Train (or only evaluate) as `cfg` says; on resume, the keys not in `given` (default: those cfg sets
    to other values than TrainConfig's defaults) come from the checkpoint (model_init.resumed_config).
    Returns final_train_loss (of the last eval), final_val_loss, best_val_loss, total_train_time (seconds
    in optimizer steps, evals and checkpoints excluded), elapsed_s (wall seconds, all included),
    tokens_per_sec, iter_num, out_dir and stopped_by (the signal that stopped it early, or None)."""
    device = resolve_device(cfg.device)
    keep_freed_memory(device)  # no page faults for each CPU step's activations
    env = distributed.init(device, cfg.backend)
    try:
        # prints come from rank 0 only; every rank still reports errors on stderr
        quiet = contextlib.nullcontext() if env.master else contextlib.redirect_stdout(io.StringIO())
        with quiet, StopRequest() as stop:
            check_fresh_out_dir(cfg)
            given = given_values(cfg) if given is None else given
            ckpt = load_checkpoint(resume_path(cfg.out_dir)) if cfg.init_from == "resume" else None
            if ckpt is not None:
                cfg = resumed_config(cfg, ckpt, given)
                if ckpt["iter_num"] >= cfg.max_iters and not cfg.eval_only:
                    return complete_run(cfg, ckpt)
            run = Run(cfg, env, device, ckpt, given)
            # one trainer per out_dir: a second one is refused before it writes anything
            with folder_lock(cfg.out_dir, "training") if env.master else contextlib.nullcontext():
                if env.master:
                    run.start()
                log = RunLog(cfg, run.start_iter) if env.master else NullLog()
                try:
                    run.loop(stop, log)
                finally:
                    log.close()
            result = run.result(stop.signal_name)
        # all ranks done before any leaves: gloo aborted a rank that tore down its connections while
        # rank 0 still wrote the last checkpoint (half the runs of tests/test_distributed.py under load)
        distributed.barrier(env)
        return result
    finally:
        distributed.close(env)


def check_fresh_out_dir(cfg: TrainConfig) -> None:
    """A new run (not init_from=resume) does not replace a checkpoint in its out_dir unless told to."""
    found = [n for n in (CKPT_NAME, RESUME_NAME) if (Path(cfg.out_dir) / n).is_file()]
    if cfg.init_from != "resume" and found and not cfg.overwrite:
        raise NanoGPTError(
            f"{cfg.out_dir} holds the checkpoint of an earlier run ({found[0]}): continue it with "
            "--init_from=resume, replace it with --overwrite=true, or give another --out_dir"
        )


def complete_run(cfg: TrainConfig, ckpt: dict[str, Any]) -> dict[str, Any]:
    """A resumed run already at max_iters is complete (said, nothing changed); below its iteration is an
    error. Returns train's result for it."""
    iter_num = ckpt["iter_num"]
    if iter_num > cfg.max_iters:
        raise NanoGPTError(
            f"max_iters={cfg.max_iters} is below iteration {iter_num} of {cfg.out_dir}'s checkpoint (nothing "
            f"changed): give --max_iters={iter_num} or more"
        )
    print(
        f"{cfg.out_dir} is complete: at iteration {iter_num} = max_iters, nothing to train (nothing changed). "
        "Give a larger --max_iters to train on"
    )
    return {
        "final_train_loss": math.nan,
        "final_val_loss": math.nan,
        "best_val_loss": float(ckpt["best_val_loss"]),
        "total_train_time": ckpt.get("train_time", 0.0),
        "elapsed_s": ckpt.get("elapsed_s", 0.0),
        "tokens_per_sec": math.nan,
        "iter_num": iter_num,
        "out_dir": cfg.out_dir,
        "stopped_by": None,
    }


class StopRequest:
    """SIGINT / SIGTERM ask the loop to finish its step, save and return; a second SIGINT aborts at once.
    Handlers are installed only from the main thread, and the previous ones are restored on exit."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: finishing this step, then saving (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Run:
    """One training run, set up as its config says; `loop` trains it. Every rank builds one: all compute,
    rank 0 alone writes (the other ranks' log is a NullLog)."""

    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        device: str,
        ckpt: dict[str, Any] | None = None,
        given: set[str] | None = None,
    ):
        """ckpt: the checkpoint a resumed run continues (cfg already resumed_config's); given: the keys the
        command gave (default: those cfg sets to other values than the defaults)."""
        self.cfg, self.env, self.device = cfg, env, device
        self.dtype = resolve_dtype(cfg.dtype, device)
        self.accum = distributed.per_rank_accumulation(cfg.gradient_accumulation_steps, env.world_size)
        torch.backends.cuda.matmul.allow_tf32 = True  # tf32 matmuls and convolutions on Ampere+ GPUs
        torch.backends.cudnn.allow_tf32 = True
        self.autocast = autocast(device, self.dtype)
        self.peak_flops = matmul_peak_flops(device, DTYPES[self.dtype])  # what MFU is measured against

        # data (a prepared dataset, or conversations read and checked for SFT), and the model: from
        # scratch, from out_dir's checkpoint, or from GPT-2 weights
        self.sft = sft_data(cfg, ckpt) if cfg.sft_data else None
        self.data_dir = None if self.sft else dataset_dir(cfg, env)
        self.meta = self.sft.meta if self.sft else read_meta(self.data_dir)
        _seed_everything(cfg.seed)  # the same initial weights on every rank (FSDP shards them as they are)
        self.raw_model = init_model(cfg, self.meta, ckpt).to(device)
        if ckpt is None and cfg.init_from != "scratch":  # fine-tuning: the shape is the base's
            given = given_values(cfg) if given is None else given
            cfg = self.cfg = fine_tune_config(cfg, self.raw_model.config, given)
        self.block_size = self.raw_model.config.block_size
        if self.sft:
            self.sft.pack(self.raw_model, cfg.seed)  # GPT-2's weights: padded to hold the chat tokens
        for split in () if self.sft else ("train", "val"):  # once, at start
            check_token_ids(
                load_split(self.data_dir, split),
                self.raw_model.config.vocab_size,
                f"the {split} split of {self.data_dir}",
            )
        self.tokens_per_iter = self.accum * env.world_size * cfg.batch_size * self.block_size
        self._build_step()
        self.loader = self.new_loader(cfg.seed, env.rank, env.world_size, cfg.batch_order)
        _seed_everything(cfg.seed + env.rank)  # dropout differs across ranks, like their batches
        self.iter_num, self.best_val_loss, self.train_time = 0, math.inf, 0.0
        self.elapsed_before, self.started, self.eval_seconds = 0.0, time.perf_counter(), 0.0
        if ckpt is not None:
            self._restore(ckpt)
        self.start_iter = self.iter_num
        # whether out_dir's ckpt.pt is this run's (a resumed run's, or saved since): a complete run has one
        self.has_checkpoint = ckpt is not None and (Path(cfg.out_dir) / CKPT_NAME).is_file()
        self.batches = TrainBatches(self.loader)  # the first batch, fetched ahead
        self.last_eval: dict[str, float] = {}
        self.last_loss = math.nan
        self.task_evaluator = benchmark_tasks(cfg, self.meta, self.block_size, env)
        print(f"config: {json.dumps(to_dict(cfg))}")
        print(f"device {device}, dtype {self.dtype}, {env.world_size} process(es)")
        print(f"number of parameters: {self.raw_model.get_num_params() / 1e6:.2f}M")
        print(f"tokens per iteration will be: {self.tokens_per_iter:,}")

    def start(self) -> None:
        """The first writes, once everything is valid (a failed start leaves out_dir as it was) and out_dir
        is locked: the config, after the temporaries of killed processes are gone."""
        for stale in remove_stale_temporaries(self.cfg.out_dir):
            print(f"removed {stale}, left by a process that no longer runs")
        write_text_atomic(
            Path(self.cfg.out_dir) / "config.json", json.dumps(to_dict(self.cfg), indent=2) + "\n"
        )

    def _build_step(self) -> None:
        """Replicate (DDP) or shard (FSDP) the model across processes, then compile it; the optimizer sees
        the final parameters."""
        cfg = self.cfg
        if cfg.activation_checkpointing:
            checkpoint_activations(self.raw_model)
        self.wrapped = distributed.wrap(self.raw_model, self.env, cfg.parallel, self.device)
        self.model = self.wrapped
        if wants_compile(cfg.compile, self.device, cfg.max_seconds):
            print("compiling the model... (takes a ~minute)")
            self.model = torch.compile(self.wrapped, options=compile_options(self.device))
        optimizer = build_optimizer(self.raw_model, cfg, device_type(self.device))
        # the weights' average starts from the weights as they are (a resumed run's: its saved average)
        self.ema = WeightEMA(self.raw_model, cfg.ema_decay) if cfg.ema_decay else None
        self.peak_lrs = [group["lr"] for group in optimizer.param_groups]  # AdamW's and Muon's peaks
        self.step = TrainStep(
            self.model,
            self.wrapped,
            list(self.raw_model.parameters()),
            optimizer,
            new_scaler(self.device, self.dtype),
            self.autocast,
            self.accum,
            cfg.grad_clip,
            cfg.label_smoothing,
        )

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Continue a checkpoint's run exactly: its optimizer, gradient scaler, batch stream and generators."""
        self.iter_num, self.best_val_loss = ckpt["iter_num"], float(ckpt["best_val_loss"])
        self.train_time = ckpt.get("train_time", 0.0)  # of the parts before: the run's total stays true
        self.elapsed_before = ckpt.get("elapsed_s", 0.0)  # wall time of the parts before, evals included
        self._restore_optimizer(ckpt)
        if "ema" in ckpt:  # its model is the average: training goes on from the raw weights saved beside
            restore_raw_weights(self.raw_model, ckpt["ema"]["raw"])
            if self.ema is not None:
                self.ema.updates = ckpt["ema"]["updates"]
        if is_nanogpt_checkpoint(ckpt):
            print("a nanoGPT checkpoint saves no RNG state or data position: resumed with fresh ones")
            return
        if ckpt["scaler"]:
            self.step.scaler.load_state_dict(ckpt["scaler"])
        self.loader.load_state_dict(ckpt["loader"])
        states = ckpt["rng"]
        if len(states) == self.env.world_size:  # each rank continues its own generators
            restore_rng(states[self.env.rank], self.device)
        else:
            print(
                f"checkpoint made by {len(states)} process(es), now {self.env.world_size}: dropout RNG is reseeded"
            )

    def _restore_optimizer(self, ckpt: dict[str, Any]) -> None:
        """The checkpoint's optimizer state (moments, steps) under this run's hyperparameters (cfg's weight
        decay, betas, momentum: the checkpoint's unless the command changed them)."""
        optimizer = self.step.optimizer
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        try:
            if is_nanogpt_checkpoint(ckpt):  # its AdamW state, by position (our parameters are in its order)
                optimizer.load_state_dict(ckpt["optimizer"])
            else:
                set_optimizer_state_dict(self.wrapped, optimizer, ckpt["optimizer"], options=FULL_STATE)
        except (KeyError, ValueError, RuntimeError) as e:
            raise NanoGPTError(
                f"the optimizer state of {self.cfg.out_dir}'s checkpoint does not fit optimizer="
                f"{self.cfg.optimizer!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                "resume with the optimizer it was trained with"
            ) from None
        for group, values in zip(optimizer.param_groups, hyper, strict=True):
            group.update(values)

    def loop(self, stop: StopRequest, log: RunLog | NullLog) -> None:
        """Until max_iters (or the max_seconds budget, with a final evaluation): evaluate (and save) every
        eval_interval, one optimizer step per iteration, and stop early, saved, at a signal."""
        cfg = self.cfg
        self.started = time.perf_counter()
        while True:
            spent = self.budget_spent()
            done = cfg.eval_only or self.iter_num >= cfg.max_iters or (spent is not None and spent >= 1)
            if self.iter_num % cfg.eval_interval == 0 or done:
                self.evaluate(log)
            if done:
                if not cfg.eval_only:
                    self.finish(log)
                return
            self.train_one_step(log, spent)
            # SIGINT / SIGTERM: every rank stops after the same step
            if distributed.any_rank(stop.signal_name is not None, self.env, self.device):
                self.save(log, CKPT_NAME if cfg.always_save_checkpoint else RESUME_NAME)
                log.message(
                    f"stopped by {stop.signal_name or 'another rank'} at iteration {self.iter_num}. To resume: "
                    f"the same command with --init_from=resume --out_dir={cfg.out_dir}"
                )
                return

    def finish(self, log: RunLog | NullLog) -> None:
        """A complete run leaves a checkpoint: the final model where no evaluation saved one (none improved
        on the first, with always_save_checkpoint=false, or no step was taken). A stopped part's state is
        superseded."""
        if not self.has_checkpoint:
            log.message(
                f"no evaluation after iteration {self.start_iter} improved on the best val loss "
                f"({self.best_val_loss:.4f}) to save a checkpoint: saving the final model (iteration {self.iter_num})"
            )
            self.save(log)
        if self.env.master:
            discard_resume(self.cfg.out_dir)

    def elapsed_s(self) -> float:
        """Wall seconds of the run so far, evaluations and checkpoints included (earlier parts too)."""
        return self.elapsed_before + time.perf_counter() - self.started

    def budget_spent(self) -> float | None:
        """The share of max_seconds spent once the final evaluation is done (timed as the last one), the
        same on every rank; None without a budget."""
        if not self.cfg.max_seconds:
            return None
        spent = (self.elapsed_s() + self.eval_seconds) / self.cfg.max_seconds
        return distributed.all_sum([spent], self.env, self.device)[0] / self.env.world_size

    def new_loader(
        self, seed: int, rank: int = 0, world_size: int = 1, order: str = "random"
    ) -> BatchLoader | SFTLoader:
        """Batches of the run's data: windows of the prepared dataset (in `order`), or SFT's packed
        conversations."""
        if self.sft:
            return self.sft.loader(self.cfg.batch_size, self.device, seed, rank, world_size)
        return BatchLoader(
            self.data_dir,
            self.cfg.batch_size,
            self.block_size,
            self.device,
            seed,
            rank,
            world_size,
            order,
        )

    def evaluate(self, log: RunLog | NullLog) -> None:
        """Estimate the train and val loss; save a checkpoint if val improved (or always, if so asked)."""
        t0, elapsed = time.perf_counter(), self.elapsed_s()
        with self.averaged():
            losses = estimate_loss(
                self.model, self.new_loader, self.cfg, self.block_size, self.device, self.autocast, self.env
            )
            _check_finite(losses["val"] + losses["train"], self.iter_num, self.cfg.out_dir)
            record = {"iter": self.iter_num, "train_loss": losses["train"], "val_loss": losses["val"]}
            if self.task_evaluator is not None:  # rank 0 alone; the others wait at their next step
                record |= self.task_evaluator(self.raw_model, self.device, self.dtype)
        self.last_eval = losses
        log.log_eval(record | {"elapsed_s": elapsed})  # wall seconds when this evaluation began
        if losses["val"] < self.best_val_loss or self.cfg.always_save_checkpoint:
            self.best_val_loss = min(self.best_val_loss, losses["val"])
            if self.iter_num > self.start_iter:  # the state at start_iter is already on disk (or is GPT-2's)
                self.save(log)
        self.eval_seconds = time.perf_counter() - t0

    def train_one_step(self, log: RunLog | NullLog, progress: float | None = None) -> None:
        """Set the learning rate, take one optimizer step, and log it every log_interval iterations.
        progress: the share of the time budget spent, which the schedule follows (None: by iteration)."""
        cfg = self.cfg
        lr = cfg.learning_rate
        if cfg.decay_lr:
            lr = get_lr(
                self.iter_num,
                cfg.learning_rate,
                cfg.warmup_iters,
                cfg.lr_decay_iters,
                cfg.min_lr,
                cfg.lr_schedule,
                cfg.decay_fraction,
                progress,
            )
        # every group on the same schedule, each from its own peak (AdamW's learning_rate, Muon's)
        for param_group, peak in zip(self.step.optimizer.param_groups, self.peak_lrs, strict=True):
            param_group["lr"] = lr * (peak / cfg.learning_rate)
        t0 = time.perf_counter()
        loss, grad_norm = self.step(self.batches)
        if self.ema is not None:
            self.ema.update()
        if self.iter_num % cfg.log_interval == 0:  # reading the loss waits for the GPU: only here
            lossf, normf = distributed.all_sum([loss.item(), _full(grad_norm).item()], self.env, self.device)
            lossf, normf = lossf / self.env.world_size, normf / self.env.world_size
            _check_finite(lossf, self.iter_num, cfg.out_dir)
            dt = time.perf_counter() - t0
            self.last_loss = lossf
            log.log_iter(
                {
                    "iter": self.iter_num,
                    "loss": lossf,
                    "lr": lr,
                    "ms": dt * 1000,
                    "tokens_per_sec": self.tokens_per_iter / dt,
                    "mfu": self.raw_model.estimate_mfu(cfg.batch_size * self.accum, dt, self.peak_flops),
                    "grad_norm": normf,
                }
            )
        self.train_time += time.perf_counter() - t0
        self.iter_num += 1
        log.step()

    def save(self, log: RunLog | NullLog, name: str = CKPT_NAME) -> None:
        """Save everything that decides the next steps to out_dir/name (a collective: every rank calls it)."""
        with self.averaged():  # the model saved is the one evaluated (state_dict's tensors are views: copies)
            model_state, optimizer_state = get_state_dict(
                self.wrapped, self.step.optimizer, options=FULL_STATE
            )
            model_state = {k: v.clone() for k, v in model_state.items()} if self.ema else model_state
        rng = distributed.gather(rng_state(self.device), self.env)
        if self.env.master:
            ckpt = training_checkpoint(
                model=model_state,
                optimizer=optimizer_state,
                scaler=self.step.scaler.state_dict(),
                model_args=asdict(self.raw_model.config),
                iter_num=self.iter_num,
                best_val_loss=self.best_val_loss,
                config=to_dict(self.cfg),
                tokenizer=self.sft.tokenizer_meta if self.sft else self.meta["tokenizer"],  # SFT: + template
                rng=rng,
                loader=self.batches.resume_state,
                train_time=self.train_time,
                elapsed_s=self.elapsed_s(),
            )
            if self.ema is not None:
                ckpt["ema"] = {
                    "raw": self.ema.raw_state(),
                    "updates": self.ema.updates,
                    "decay": self.ema.decay,
                }
            ckpt = lora_checkpoint(ckpt, self.raw_model)  # a LoRA run saves its adapters only
            log.message(f"saving checkpoint to {save_checkpoint(ckpt, self.cfg.out_dir, name)}")
        self.has_checkpoint = self.has_checkpoint or name == CKPT_NAME

    def averaged(self) -> contextlib.AbstractContextManager:
        """The model holds the weights' average inside the block, if the run keeps one (ema_decay)."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def result(self, stopped_by: str | None) -> dict[str, Any]:
        steps = self.iter_num - self.start_iter
        return {
            "final_train_loss": self.last_eval.get("train", self.last_loss),
            "final_val_loss": self.last_eval.get("val", math.nan),
            "best_val_loss": self.best_val_loss,
            "total_train_time": self.train_time,
            "elapsed_s": self.elapsed_s(),
            "tokens_per_sec": self.tokens_per_iter * steps / self.train_time if self.train_time else math.nan,
            "iter_num": self.iter_num,
            "out_dir": self.cfg.out_dir,
            "stopped_by": stopped_by,
        }


class TrainBatches:
    """The training batches, one fetched ahead (on a GPU its copy overlaps the step's compute).
    `resume_state` is the loader's state before that pending batch: a resumed run draws it again."""

    def __init__(self, loader: BatchLoader):
        self.loader = loader
        self._fetch()

    def _fetch(self) -> None:
        self.resume_state = self.loader.state_dict()
        self.pending = self.loader.get_batch("train")

    def __call__(self) -> Batch:
        batch = self.pending
        self._fetch()
        return batch


def dataset_dir(cfg: TrainConfig, env: DistEnv) -> Path:
    """data_dir/dataset, prepared first by rank 0 if it is a known dataset that is not there yet."""
    if env.master:
        ensure_prepared(cfg.dataset, cfg.data_dir)
    distributed.barrier(env)
    return Path(cfg.data_dir) / cfg.dataset


def benchmark_tasks(
    cfg: TrainConfig, meta: dict[str, Any], block_size: int, env: DistEnv
) -> TaskEvaluator | None:
    """The eval_tasks, prompted once (rank 0 only), or None."""
    if not cfg.eval_tasks or not env.master:
        return None
    tokenizer = tokenizer_from_meta(meta["tokenizer"])
    evaluator = TaskEvaluator(cfg.eval_tasks, tokenizer, block_size, cfg.eval_tasks_limit)
    for name, skipped in evaluator.skipped().items():
        print(f"eval_tasks: {skipped} items of {name} skipped (characters the tokenizer lacks, or too long)")
    return evaluator


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module,
    new_loader: Callable[[int], Any],  # seed -> a loader of the run's data (Run.new_loader)
    cfg: TrainConfig,
    block_size: int,
    device: str,
    ctx: Any,
    env: DistEnv,
) -> dict[str, float]:
    """The mean loss of each split over the same eval_iters batches at every eval, whatever the number of
    processes: the batches are dealt out among the ranks, which all run the same number of forward passes
    (FSDP needs every rank in each one), the extras not counted."""
    out = {}
    model.eval()
    per_rank = math.ceil(cfg.eval_iters / env.world_size)
    for split in ("train", "val"):
        loader = new_loader(EVAL_SEED)
        total = torch.zeros((), device=device)
        for k in range(per_rank * env.world_size):
            X, Y = loader.get_batch(split)
            if k % env.world_size == env.rank:
                with ctx:
                    _, loss = model(X, Y)
                total += loss.float() if k < cfg.eval_iters else 0.0
        out[split] = distributed.all_sum([total.item()], env, device)[0] / cfg.eval_iters
    model.train()
    return out


def _check_finite(loss: float, iter_num: int, out_dir: str) -> None:
    if not math.isfinite(loss):
        raise NanoGPTError(
            f"the loss is {loss} at iteration {iter_num}: training stopped. The last good checkpoint (if any) "
            f"is kept in {out_dir}. Try a lower learning_rate, grad_clip=1.0 or dtype=float32."
        )


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's gradient norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # and every CUDA device's
