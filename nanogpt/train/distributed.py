"""Running under torchrun: one process per device, DDP (replicated model) or FSDP2 (sharded model).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without RANK everything here is a no-op and training is a
single process. Rank 0 logs and saves; every rank computes, on its own stream of batches.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanogpt.errors import NanoGPTError
from nanogpt.processes import die_with_parent


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False  # launched by torchrun, with a process group

    @property
    def master(self) -> bool:
        return self.rank == 0


def init(device: str, backend: str) -> DistEnv:
    """Join the torchrun job if there is one (RANK is set), else a single process."""
    if "RANK" not in os.environ:
        return DistEnv()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a worker of torchrun's agent: ends with it, even after kill -9
        die_with_parent(os.getppid())
    env = DistEnv(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), True)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, device_id=torch.device(device) if backend == "nccl" else None)
    return env


def close(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def per_rank_accumulation(gradient_accumulation_steps: int, world_size: int) -> int:
    """Each rank does its share of the micro-steps, so the global batch does not depend on world_size."""
    if gradient_accumulation_steps % world_size:
        raise NanoGPTError(
            f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the number of "
            f"processes ({world_size}): each process does gradient_accumulation_steps / {world_size} micro-steps"
        )
    return gradient_accumulation_steps // world_size


def wrap(model: nn.Module, env: DistEnv, parallel: str, device: str) -> nn.Module:
    """The module to train: the model itself (one process), DDP around it, or the model sharded in place
    by FSDP2 (each block, then the rest: embeddings, ln_f, the tied lm_head)."""
    if not env.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # the mesh names the training device: FSDP's default takes CUDA wherever there is a GPU, so a CPU
        # run on a one-GPU machine asked rank 1 for GPU 1 (seen on an H100 machine)
        mesh = init_device_mesh(torch.device(device).type, (env.world_size,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # the only buffers are the constant causal masks: no need to broadcast them before every forward
    # (under its newer name where torch has it: 2.13 warns that broadcast_buffers is deprecated)
    no_sync = (
        "forward_sync_buffers"
        if "forward_sync_buffers" in inspect.signature(DDP).parameters
        else "broadcast_buffers"
    )
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DDP(model, device_ids=device_ids, **{no_sync: False})


def set_grad_sync(model: nn.Module, sync: bool) -> None:
    """Reduce gradients only on the last micro-step: the others just accumulate locally."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP (nanoGPT's way: no_sync() as a flag)
        model.require_backward_grad_sync = sync


def all_sum(values: list[float], env: DistEnv, device: str) -> list[float]:
    """The sum of each value over all ranks (the values themselves in a single process)."""
    if not env.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, env: DistEnv, device: str) -> bool:
    """True on every rank if it is True on some rank (so that all ranks stop at the same step)."""
    return all_sum([float(flag)], env, device)[0] > 0


def gather(obj: object, env: DistEnv) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not env.enabled:
        return [obj]
    objs: list = [None] * env.world_size
    dist.all_gather_object(objs, obj)
    return objs


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
