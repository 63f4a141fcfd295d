"""`nanogpt train`: the training loop, in the order of nanoGPT's train.py.

Set-up (device, precision, torchrun, data, model, optimizer, resume), then the loop: every eval_interval
estimate the loss and save a checkpoint; every iteration one optimizer step of gradient_accumulation_steps
micro-steps; every log_interval a log line. One process on a CPU, a GPU or an Apple GPU, or many under
`torchrun` (DDP, or FSDP2 with --parallel=fsdp).

    nanogpt train shakespeare_char_cpu --max_iters=500
    torchrun --standalone --nproc_per_node=8 -m nanogpt train gpt2_124m
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
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

from nanogpt.checkpoint import (
    CKPT_NAME,
    RESUME_NAME,
    clean_state_dict,
    discard_resume,
    load_checkpoint,
    resume_path,
    save_checkpoint,
)
from nanogpt.config import to_dict
from nanogpt.data.loader import BatchLoader, read_meta
from nanogpt.device import (
    DTYPES,
    autocast,
    compile_options,
    keep_freed_memory,
    matmul_peak_flops,
    resolve_device,
    resolve_dtype,
    wants_compile,
)
from nanogpt.errors import NanoGPTError
from nanogpt.files import write_text_atomic
from nanogpt.model import GPT, GPTConfig
from nanogpt.train import distributed
from nanogpt.train.config import TrainConfig, load_train_config, train_help
from nanogpt.train.distributed import DistEnv
from nanogpt.train.metrics import RunLog
from nanogpt.train.schedule import get_lr

# Eval batches come from a loader of their own with this seed: the same windows at every eval (smoother
# curves that compare across runs), and evaluating never shifts the training stream (exact resume).
EVAL_SEED = 1234
# optimizer and model state as one full (unsharded) dict keyed by parameter name, the same under one
# process, DDP and FSDP, so any of them resumes any other's checkpoint
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(train_help())
        return 0
    train(load_train_config(argv))
    return 0


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or only evaluate) as `cfg` says. Returns final_train_loss (of the last eval), final_val_loss,
    best_val_loss, total_train_time (seconds in optimizer steps, evals and checkpoints excluded),
    tokens_per_sec, iter_num, out_dir and stopped_by (the signal that stopped it early, or None)."""
    device = resolve_device(cfg.device)
    keep_freed_memory(device)  # no page faults for each CPU step's activations
    env = distributed.init(device, cfg.backend)
    try:
        with StopRequest() as stop:
            result = _train(cfg, env, device, stop)
        # all ranks done before any leaves: gloo aborted a rank that tore down its connections while
        # rank 0 still wrote the last checkpoint (half the runs of tests/test_distributed.py under load)
        distributed.barrier(env)
        return result
    finally:
        distributed.close(env)


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


def _train(cfg: TrainConfig, env: DistEnv, device: str, stop: StopRequest) -> dict[str, Any]:
    device_type = torch.device(device).type  # for autocast and the gradient scaler
    dtype_name = resolve_dtype(cfg.dtype, device)
    dtype = DTYPES[dtype_name]
    accum = distributed.per_rank_accumulation(cfg.gradient_accumulation_steps, env.world_size)
    if env.master:
        print(f"config: {json.dumps(to_dict(cfg))}")
        write_text_atomic(Path(cfg.out_dir) / "config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
        print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, {env.world_size} process(es)")
    torch.backends.cuda.matmul.allow_tf32 = True  # tf32 matmuls and convolutions on Ampere+ GPUs
    torch.backends.cudnn.allow_tf32 = True
    ctx = autocast(device, dtype_name)
    # MFU against this machine's measured matmul peak on a CPU; nanoGPT's A100 bf16 peak on a GPU
    peak_flops = matmul_peak_flops(device, dtype) if device_type == "cpu" else None

    # data, and the model: from scratch, from out_dir's checkpoint, or from GPT-2 weights
    data_dir = dataset_dir(cfg, env)
    meta = read_meta(data_dir)
    ckpt = (
        load_checkpoint(resume_path(cfg.out_dir), map_location="cpu") if cfg.init_from == "resume" else None
    )
    _seed_everything(cfg.seed)  # the same initial weights on every rank (FSDP shards them as they are)
    raw_model = init_model(cfg, meta, ckpt).to(device)
    block_size = raw_model.config.block_size
    tokens_per_iter = accum * env.world_size * cfg.batch_size * block_size
    if env.master:
        print(f"number of parameters: {raw_model.get_num_params() / 1e6:.2f}M")
        print(f"tokens per iteration will be: {tokens_per_iter:,}")

    # replicate (DDP) or shard (FSDP) across processes, then compile; the optimizer sees the final parameters
    wrapped = distributed.wrap(raw_model, env, cfg.parallel, device)
    model = wrapped
    if wants_compile(cfg.compile, device):
        print("compiling the model... (takes a ~minute)")
        model = torch.compile(wrapped, options=compile_options(device))
    optimizer = raw_model.configure_optimizers(
        cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type
    )
    # a gradient scaler keeps float16 gradients from underflowing; a no-op for other dtypes
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    loader = BatchLoader(data_dir, cfg.batch_size, block_size, device, cfg.seed, env.rank, env.world_size)
    _seed_everything(cfg.seed + env.rank)  # dropout differs across ranks, like their batches
    iter_num, best_val_loss = 0, math.inf
    if ckpt is not None:
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        set_optimizer_state_dict(wrapped, optimizer, ckpt["optimizer"], options=FULL_STATE)
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"])
        _restore_rng(ckpt["rng"], env, device)
        del ckpt  # free the memory
    start_iter = iter_num

    run_log = RunLog(cfg, start_iter) if env.master else None
    say = run_log.message if run_log else lambda text: None

    def checkpoint(batch_state: dict, name: str = CKPT_NAME) -> None:
        """Save everything that decides the next steps (a collective: every rank calls it) to ckpt.pt,
        or to resume.pt when a signal stops a run whose ckpt.pt keeps its best model."""
        model_state, optimizer_state = get_state_dict(wrapped, optimizer, options=FULL_STATE)
        rng = distributed.gather(_rng_state(device), env)
        if env.master:
            state = {
                "model": clean_state_dict(model_state),
                "optimizer": optimizer_state,
                "scaler": scaler.state_dict(),
                "model_args": asdict(raw_model.config),
                "iter_num": iter_num,
                "best_val_loss": best_val_loss,
                "config": to_dict(cfg),
                "tokenizer": meta["tokenizer"],
                "rng": rng,  # one state per rank
                "loader": batch_state,
            }
            say(f"saving checkpoint to {save_checkpoint(state, cfg.out_dir, name)}")

    train_time, last_eval, last_loss = 0.0, {}, math.nan
    batch_state = loader.state_dict()  # the loader's state before the pending batch: a resume redraws it
    X, Y = loader.get_batch("train")  # fetch the very first batch
    try:
        while True:
            # determine and set the learning rate for this iteration
            lr = cfg.learning_rate
            if cfg.decay_lr:
                lr = get_lr(iter_num, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr

            # evaluate the loss on train/val sets and write checkpoints
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only:
                losses = estimate_loss(model, data_dir, cfg, block_size, device, ctx, env)
                _check_finite(losses["val"] + losses["train"], iter_num, cfg.out_dir)
                last_eval = losses
                if run_log:
                    run_log.log_eval(
                        {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"]}
                    )
                if losses["val"] < best_val_loss or cfg.always_save_checkpoint:
                    best_val_loss = min(best_val_loss, losses["val"])
                    if iter_num > start_iter:  # the state at start_iter is already on disk (or is GPT-2's)
                        checkpoint(batch_state)
            if cfg.eval_only or iter_num >= cfg.max_iters:
                if env.master and not cfg.eval_only:  # complete: a stopped part's state is superseded
                    discard_resume(cfg.out_dir)
                break

            # forward backward update, with gradient accumulation to simulate a larger batch
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for micro_step in range(accum):
                distributed.set_grad_sync(wrapped, micro_step == accum - 1)
                with ctx:
                    _, loss = model(X, Y)
                    loss = loss / accum  # scale the loss to account for gradient accumulation
                if micro_step == accum - 1:
                    batch_state = loader.state_dict()
                # fetch the next batch while the GPU is busy with the forward pass (it copies asynchronously)
                X, Y = loader.get_batch("train")
                scaler.scale(loss).backward()  # backward pass, with gradient scaling if training in fp16
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)  # clip the true gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
            scaler.step(optimizer)  # skipped if the float16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)  # free the gradients' memory until the next backward

            # timing and logging (reading the loss waits for the GPU: only every log_interval)
            if iter_num % cfg.log_interval == 0:
                lossf, normf = distributed.all_sum([loss_sum.item(), _full(grad_norm).item()], env, device)
                lossf, normf = lossf / env.world_size, normf / env.world_size
                _check_finite(lossf, iter_num, cfg.out_dir)
                dt = time.perf_counter() - t0
                last_loss = lossf
                if run_log:
                    run_log.log_iter(
                        {
                            "iter": iter_num,
                            "loss": lossf,
                            "lr": lr,
                            "ms": dt * 1000,
                            "tokens_per_sec": tokens_per_iter / dt,
                            "mfu": raw_model.estimate_mfu(cfg.batch_size * accum, dt, peak_flops),
                            "grad_norm": normf,
                        }
                    )
            train_time += time.perf_counter() - t0
            iter_num += 1
            if run_log:
                run_log.step()

            # SIGINT / SIGTERM: every rank stops after the same step
            if distributed.any_rank(stop.signal_name is not None, env, device):
                checkpoint(batch_state, CKPT_NAME if cfg.always_save_checkpoint else RESUME_NAME)
                say(
                    f"stopped by {stop.signal_name or 'another rank'} at iteration {iter_num}. To resume: the same "
                    f"command with --init_from=resume --out_dir={cfg.out_dir}"
                )
                break
    finally:
        if run_log:
            run_log.close()

    final_train_loss = last_eval.get("train", last_loss)
    return {
        "final_train_loss": final_train_loss,
        "final_val_loss": last_eval.get("val", math.nan),
        "best_val_loss": best_val_loss,
        "total_train_time": train_time,
        "tokens_per_sec": tokens_per_iter * (iter_num - start_iter) / train_time if train_time else math.nan,
        "iter_num": iter_num,
        "out_dir": cfg.out_dir,
        "stopped_by": stop.signal_name,
    }


def dataset_dir(cfg: TrainConfig, env: DistEnv) -> Path:
    """data_dir/dataset, prepared first (by rank 0) if it is a known dataset that is not there yet."""
    from nanogpt.data.prepare import DATASETS, prepare_dataset

    path = Path(cfg.data_dir) / cfg.dataset
    if not (path / "meta.json").is_file() and cfg.dataset in DATASETS:
        if env.master:
            print(
                f"{path} is not prepared: running `nanogpt prepare {cfg.dataset} --data_dir={cfg.data_dir}`"
            )
            prepare_dataset(cfg.dataset, data_dir=cfg.data_dir)
        distributed.barrier(env)
    return path


def model_vocab_size(meta: dict) -> int:
    """The dataset's vocabulary; GPT-2's 50257 padded up to 50304, a multiple of 64, as nanoGPT does (faster)."""
    vocab_size = int(meta["vocab_size"])
    return -(-vocab_size // 64) * 64 if meta["tokenizer"]["name"] == "gpt2" else vocab_size


def init_model(cfg: TrainConfig, meta: dict, ckpt: dict | None) -> GPT:
    """A new model (scratch), the checkpoint's (resume: its shapes win over cfg's) or GPT-2's (cropped to
    cfg.block_size if that is shorter). Dropout always comes from cfg."""
    if ckpt is not None:
        print(f"resuming training from {cfg.out_dir} at iteration {ckpt['iter_num']}")
        model = GPT(GPTConfig(**{**ckpt["model_args"], "dropout": cfg.dropout}))
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    elif cfg.init_from == "scratch":
        print("initializing a new model from scratch")
        model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, bias=cfg.bias)
        model = GPT(
            GPTConfig(
                block_size=cfg.block_size,
                vocab_size=model_vocab_size(meta),
                dropout=cfg.dropout,
                **model_args,
            )
        )
    else:
        print(f"initializing from OpenAI GPT-2 weights: {cfg.init_from}")
        model = GPT.from_pretrained(cfg.init_from, dict(dropout=cfg.dropout))
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)  # model surgery: a shorter context
    if meta["vocab_size"] > model.config.vocab_size:
        raise NanoGPTError(
            f"the dataset's vocabulary ({meta['vocab_size']} tokens) does not fit the model's "
            f"({model.config.vocab_size}): init_from={cfg.init_from!r} does not match dataset={cfg.dataset!r}"
        )
    return model


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module,
    data_dir: Path,
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
        loader = BatchLoader(data_dir, cfg.batch_size, block_size, device, seed=EVAL_SEED)
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


def _rng_state(device: str) -> dict[str, Any]:
    """Python's, numpy's, torch's and CUDA's generator states as lists and tensors (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None,
    }


def _restore_rng(states: list[dict[str, Any]], env: DistEnv, device: str) -> None:
    """Each rank continues its own generators; with another number of processes they stay freshly seeded."""
    if len(states) != env.world_size:
        print(f"checkpoint made by {len(states)} process(es), now {env.world_size}: dropout RNG is reseeded")
        return
    state = states[env.rank]
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)
