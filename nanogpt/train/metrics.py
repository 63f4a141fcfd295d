"""What a training run records (rank 0 only): out_dir/metrics.jsonl, out_dir/loss.png, the terminal
display (a progress bar in a terminal, plain lines otherwise) and, if asked, wandb and TensorBoard.

metrics.jsonl has one JSON object per line:
    every log_interval: {"iter", "loss", "lr", "ms", "tokens_per_sec", "mfu", "grad_norm"}
    every eval:         {"iter", "train_loss", "val_loss", "elapsed_s"} (wall seconds of the run when the
                        evaluation began, earlier evaluations included: time-to-loss reads from it)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nanogpt.errors import NanoGPTError
from nanogpt.files import atomic_open, write_text_atomic
from nanogpt.options import to_dict
from nanogpt.train.config import TrainConfig

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of out_dir/metrics.jsonl. A torn last line (a kill in the middle of an append) is
    dropped; damage anywhere else is an error naming the line."""
    path = Path(out_dir) / METRICS_NAME
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise NanoGPTError(
                f"{path} is damaged at line {number} (not JSON): delete that line, or the file to start its log afresh"
            ) from None
    return records


class RunLog:
    """Records of one run. On resume the records of iterations before `start_iter` are kept (those after
    it belong to steps the resumed run redoes); otherwise the files start afresh."""

    def __init__(self, cfg: TrainConfig, start_iter: int):
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        kept = read_metrics(self.out_dir) if cfg.init_from == "resume" else []
        self.records = [r for r in kept if r["iter"] < start_iter]
        path = self.out_dir / METRICS_NAME
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        show_bar = cfg.progress == "bar" or (cfg.progress == "auto" and sys.stdout.isatty())
        self.bar = tqdm(
            total=cfg.max_iters, initial=start_iter, unit="it", dynamic_ncols=True, disable=not show_bar
        )
        self.wandb = _start_wandb(cfg) if cfg.wandb_log else None
        self.tensorboard = _start_tensorboard(self.out_dir) if cfg.tensorboard_log else None

    def message(self, text: str) -> None:
        """A line for the reader (above the bar, when there is one)."""
        if self.bar.disable:
            print(text, flush=True)
        else:
            self.bar.write(text)

    def step(self) -> None:
        self.bar.update(1)

    def log_iter(self, record: dict[str, Any]) -> None:
        self._write(record)
        if self.bar.disable:
            print(
                f"iter {record['iter']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                f"time {record['ms']:.2f}ms, {record['tokens_per_sec']:,.0f} tok/s, "
                f"mfu {record['mfu'] * 100:.2f}%, grad norm {record['grad_norm']:.3f}",
                flush=True,
            )
        else:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", ms=f"{record['ms']:.0f}", refresh=False)

    def log_eval(self, record: dict[str, Any]) -> None:
        self._write(record)
        tasks = "".join(f", {k} {v:.4f}" for k, v in record.items() if k.endswith("_accuracy") or k == "core")
        self.message(
            f"step {record['iter']}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}"
            + tasks
        )
        self._plot()

    def _write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["iter"]
        scalars = {k: v for k, v in record.items() if k != "iter"}
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)

    def _plot(self) -> None:
        """loss.png: the logged training loss and the eval curves, rewritten (atomically) at each eval."""
        try:
            import matplotlib

            matplotlib.use("Agg")  # files only, no display needed
            import matplotlib.pyplot as plt
        except ImportError:
            return
        logs = [r for r in self.records if "loss" in r]
        evals = [r for r in self.records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(8, 5))
        if logs:
            ax.plot(
                [r["iter"] for r in logs], [r["loss"] for r in logs], lw=0.6, alpha=0.4, label="train (batch)"
            )
        for key, label in (("train_loss", "train (eval)"), ("val_loss", "val (eval)")):
            ax.plot([r["iter"] for r in evals], [r[key] for r in evals], marker="o", ms=3, label=label)
        ax.set(xlabel="iteration", ylabel="loss", title=str(self.out_dir))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        accuracies = sorted({k for r in evals for k in r if k.endswith("_accuracy")})  # eval_tasks
        if accuracies:
            right = ax.twinx()
            for key in accuracies:
                points = [(r["iter"], r[key]) for r in evals if key in r]
                right.plot(*zip(*points, strict=True), ls="--", marker="s", ms=3, label=key)
            right.set(ylabel="accuracy")
            right.legend(loc="upper right")
        with atomic_open(self.out_dir / PLOT_NAME, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


class NullLog:
    """RunLog's stand-in on ranks other than 0: records nothing, shows nothing."""

    def message(self, text: str) -> None:
        pass

    def step(self) -> None:
        pass

    def log_iter(self, record: dict[str, Any]) -> None:
        pass

    def log_eval(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _start_wandb(cfg: TrainConfig):
    try:
        import wandb
    except ImportError:
        raise NanoGPTError("wandb_log=True needs wandb: pip install 'nanogpt[wandb]'") from None
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=to_dict(cfg))


def _start_tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise NanoGPTError(
            "tensorboard_log=True needs tensorboard: pip install 'nanogpt[tensorboard]'"
        ) from None
    return SummaryWriter(str(out_dir / "tensorboard"))
