"""Processes, devices and precision: torchrun / DDP, `--device`, `--amp`.

mmtag runs as one process by default. Launched by `torchrun` (which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), the same command becomes one rank of a process group: gloo on CPU,
nccl on CUDA. Ranks split work by contiguous shards of rows (never padded, so every row counts
once), DDP averages gradients, and rank 0 alone writes files.

The functions here are no-ops (or identity) in a single process, so callers need no branches
of their own beyond "am I the writer?".
"""
from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from .errors import MmtagError

log = logging.getLogger("mmtag")
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process runs: its rank among `world` processes, and its torch device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    amp: bool = False  # autocast (fp16 + grad scaling) on CUDA; ignored on CPU

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """True on the one process that writes bundles, reports, logs and submissions."""
        return self.rank == 0

    def shard(self, n: int) -> np.ndarray:
        """This rank's contiguous share of `range(n)`; shares differ in size by at most one and
        together cover every index exactly once (no sampler padding)."""
        return np.arange(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def autocast(self) -> AbstractContextManager[Any]:
        """Mixed precision for the forward pass when `amp` is on and the device is CUDA."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()


_context = Context()


def context() -> Context:
    """The process's current Context (single-process CPU until `setup` says otherwise)."""
    return _context


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto` (CUDA if available, else CPU), `cpu`, `cuda` (this rank's GPU) or `cuda:N`."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MmtagError(f"--device {spec}: CUDA is not available on this machine "
                             "(this torch build or driver has no GPU); use --device cpu or auto")
        index = local_rank if spec == "cuda" else _gpu_index(spec)
        if index >= torch.cuda.device_count():
            raise MmtagError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible")
        return torch.device("cuda", index)
    raise MmtagError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


def _gpu_index(spec: str) -> int:
    try:
        index = int(spec.split(":", 1)[1])
    except ValueError:
        raise MmtagError(f"--device {spec!r}: expected cuda:N with N a GPU number") from None
    if index < 0:
        raise MmtagError(f"--device {spec!r}: GPU numbers start at 0")
    return index


def backend_for(device: torch.device) -> str:
    """nccl for GPUs, gloo for CPUs: the backends PyTorch recommends for each."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device: str = "auto", amp: bool = False, *, timeout_s: float = 1800) -> Context:
    """Set the process's Context from `--device`/`--amp` and, under torchrun, join the group.

    Safe to call more than once (the group is created once). Outside torchrun (no WORLD_SIZE or
    WORLD_SIZE=1) nothing distributed happens.
    """
    global _context
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if amp and dev.type != "cuda":
        log.warning("--amp has no effect on %s; running in fp32", dev)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend_for(dev), timeout=datetime.timedelta(seconds=timeout_s))
        if rank == 0:
            log.info("distributed: %d processes, backend %s", world, tdist.get_backend())
    _context = Context(rank=rank, world=world, local_rank=local_rank, device=dev,
                       amp=amp and dev.type == "cuda")
    return _context


def teardown() -> None:
    """Leave the process group (at the end of a command)."""
    global _context
    if tdist.is_initialized():
        tdist.destroy_process_group()
    _context = Context(device=_context.device, amp=_context.amp)


def barrier() -> None:
    if _context.distributed:
        tdist.barrier()


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank ([obj] in a single process)."""
    if not _context.distributed:
        return [obj]
    out: list[Any] = [None] * _context.world
    tdist.all_gather_object(out, obj)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not _context.distributed:
        return obj
    box: list[Any] = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def raise_if_any_failed(error: BaseException | None) -> None:
    """Collective: if any rank hit an error, every rank raises one (the first rank's message),
    instead of the healthy ranks waiting forever at the next collective."""
    errors = all_gather(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    for item in errors:
        if item is not None:
            raise MmtagError(f"another rank failed: {item[0]}: {item[1]}")


def checked(compute: Callable[[], T]) -> T:
    """Collective: `compute()` on every rank; if it raised MmtagError on any rank, every rank
    raises (see `raise_if_any_failed`). In a single process it is just `compute()`."""
    try:
        result = compute()
    except MmtagError as exc:
        raise_if_any_failed(exc)
        raise
    raise_if_any_failed(None)
    return result


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Each value summed over all ranks (the values themselves in a single process)."""
    return tuple(sum(column) for column in zip(*all_gather(values)))


def device_of(module: nn.Module) -> torch.device:
    """Where a module's weights live (CPU for weightless ones, e.g. ONNX Runtime encoders)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def wrap(module: nn.Module) -> nn.Module:
    """`module` in DDP when distributed (gradients averaged across ranks), else itself."""
    if not _context.distributed or not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [_context.device.index] if _context.device.type == "cuda" else None
    # Every registered head and encoder uses all its trainable parameters in each forward
    # (tests/test_dist.py checks the heads), so DDP need not search for unused ones.
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def local_batch(batch: np.ndarray) -> np.ndarray:
    """This rank's rows of one global batch (strided, so shares differ by at most one)."""
    return batch[_context.rank::_context.world]


def loss_scale(n_local: int, n_global: int) -> float:
    """Factor for a rank's mean loss so that DDP's gradient average equals the gradient of the
    mean loss over the whole global batch, even when ranks hold unequal row counts."""
    return n_local * _context.world / max(1, n_global)
