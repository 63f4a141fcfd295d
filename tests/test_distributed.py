"""Training under torchrun with two CPU processes (gloo on loopback): DDP and FSDP give the losses of one
process with the same global batch, and a failing rank ends the job instead of hanging it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ends_with_this_process, tiny_train_config

from nanogpt.checkpoint import load_checkpoint
from nanogpt.train.config import TrainConfig
from nanogpt.train.metrics import read_metrics
from nanogpt.train.trainer import train

# Run by torchrun in each process. Same global batch, same data: in production each rank draws its own
# stream (BatchLoader(rank=r)), so a DDP run sees different windows than one process. Here every rank
# instead reads the one-process stream, rank r taking batches r, r + W, r + 2W, ... (W = world size):
# with gradient_accumulation_steps = A, one process's iteration i uses batches A*i .. A*i + A - 1, and
# the W ranks' A/W micro-steps each use exactly those same A batches. The gradients are then the same
# sums in another order, so the losses agree to float rounding. FAIL_RANK makes that rank raise mid-run.
LAUNCHER = textwrap.dedent(
    """
    import os, sys
    import nanogpt.train.trainer as trainer
    from nanogpt.cli import main
    from nanogpt.data.loader import BatchLoader

    class OneProcessStream(BatchLoader):
        def __init__(self, dataset_dir, batch_size, block_size, device="cpu", seed=1337, rank=0, world_size=1,
                     order="random"):
            super().__init__(dataset_dir, batch_size, block_size, device, seed, order=order)  # rank 0 of 1's stream
            self.stream_rank, self.stream_world, self.drawn = rank, world_size, 0

        def get_batch(self, split):
            self.drawn += 1
            if os.environ.get("FAIL_RANK") == str(self.stream_rank) and self.drawn > 6:
                raise RuntimeError(f"injected failure on rank {self.stream_rank}")
            batches = [super(OneProcessStream, self).get_batch(split) for _ in range(self.stream_world)]
            return batches[self.stream_rank]

    trainer.BatchLoader = OneProcessStream
    sys.exit(main(sys.argv[1:]))
    """
)


def tiny(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    """4 micro-steps per iteration: all 4 in one process, 2 in each of two. eval_iters is odd: one rank
    gets a padding batch, not counted. No dropout: its random masks differ between ranks by design."""
    return tiny_train_config(
        data_dir,
        out_dir,
        **{
            **dict(
                gradient_accumulation_steps=4, max_iters=6, lr_decay_iters=6, eval_interval=3, eval_iters=3
            ),
            **overrides,
        },
    )


def torchrun(
    cfg: TrainConfig, tmp_path: Path, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess:
    cmd, env = torchrun_command(cfg, tmp_path, **env)
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=ends_with_this_process())  # fmt: skip


def torchrun_command(cfg: TrainConfig, tmp_path: Path, **env: str) -> tuple[list[str], dict[str, str]]:
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", **env}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(launcher), "train", *[f"--{k}={v}" for k, v in vars(cfg).items()]]  # fmt: skip
    return cmd, env


def assert_same_losses(a: Path, b: Path) -> None:
    ra, rb = read_metrics(a), read_metrics(b)
    assert [sorted(r) for r in ra] == [sorted(r) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for key in ("loss", "train_loss", "val_loss"):
            if key in x:
                assert abs(x[key] - y[key]) < 1e-5, (x, y)


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    train(tiny(data_dir, out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one(data_dir, tmp_path, one_process, parallel):
    out = tmp_path / parallel
    result = torchrun(tiny(data_dir, out, parallel=parallel), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_losses(out, one_process)
    # rank 0 saved one checkpoint, with both ranks' RNG states; any mode resumes it
    ckpt = load_checkpoint(out)
    assert ckpt["iter_num"] == 6 and len(ckpt["rng"]) == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


@pytest.mark.slow
def test_failing_rank_ends_the_job(data_dir, tmp_path):
    start = time.time()
    result = torchrun(tiny(data_dir, tmp_path / "out", max_iters=50), tmp_path, FAIL_RANK="1")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "injected failure on rank 1" in output
    assert time.time() - start < 100  # ended, not hung until the timeout


def children(pid: int) -> set[int]:
    """The pids of a process's children (Linux /proc)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return {int(c) for task in tasks for c in (task / "children").read_text().split()}


def running(pid: int) -> bool:
    """Whether pid is a process that has not ended (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_workers_end_when_torchrun_ends(data_dir, tmp_path, how):
    """kill -9 of torchrun (which cannot forward anything) or SIGTERM: no worker outlives it by 5 s."""
    out = tmp_path / "out"
    cmd, env = torchrun_command(tiny(data_dir, out, max_iters=1_000_000, eval_interval=1_000_000), tmp_path)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=ends_with_this_process())  # fmt: skip
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "torchrun never reached training"
            time.sleep(0.1)  # polling for the first logged step, not racing it
        workers = children(proc.pid)
        assert len(workers) == 2
        proc.send_signal(how)
        deadline = time.monotonic() + 5
        while any(running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if running(w)]
    finally:
        proc.kill()
        proc.wait(timeout=30)
        for worker in filter(running, workers):  # a failed check leaves none behind either
            os.kill(worker, signal.SIGKILL)
