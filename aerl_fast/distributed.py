"""Data-parallel training under torchrun:  torchrun --nproc_per_node=N -m aerl_fast.train ...

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; without them (or
with WORLD_SIZE=1) everything here is a no-op and training is the plain single-process run.

The process group is "cpu:gloo,cuda:nccl" on a machine with CUDA (tensors on the GPU travel over
NCCL, small control messages and pickled objects over gloo, without a CUDA sync) and "gloo" on a
CPU-only machine.  Each process trains on cuda:LOCAL_RANK, or on the CPU.

Semantics (the single-process run is the reference):
- `--batch-size` is the GLOBAL batch.  Every rank draws the same global batch as the single-process
  loader (same permutation, same augmentation) and keeps the contiguous slice
  [rank·b/N, (rank+1)·b/N), so the ranks' slices partition the single-process batch exactly.  The
  global batch must be a multiple of N (equal shards: DDP averages the ranks' gradients, and the
  average of per-shard mean losses is the global-batch mean only when the shards are equal).
- Dropout masks and ε-greedy draws differ per rank (their generators are seeded with
  seed + rank·RANK_PRIME; rank 0 keeps the single-process streams), so a run on N ranks matches the
  single-process run up to that randomness; BatchNorm normalises with per-rank statistics.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as tdist

from aerl_fast.errors import ConfigError, UserError

RANK_PRIME = 1_000_003  # rank r's dropout/exploration seeds are offset by r·RANK_PRIME




@dataclass
class DistContext:
    """Where this process stands in the job; world_size 1 means no process group at all."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- devices ----------------------------------------------------------------------------
    def device(self, requested: str) -> torch.device:
        """The training device of this rank for --device `requested` (cuda means cuda:LOCAL_RANK)."""
        from aerl_fast import runtime
        dev = runtime.resolve_device(requested)
        if not self.enabled or dev.type != "cuda":
            return dev
        if requested.startswith("cuda:"):
            raise ConfigError(f"--device {requested}: under torchrun each process uses cuda:LOCAL_RANK; "
                              f"pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
        if self.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                              f"on this machine; lower --nproc_per_node")
        return torch.device("cuda", self.local_rank)

    # -- collectives (all no-ops in a single process) ----------------------------------------
    def barrier(self):
        if self.enabled:
            tdist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return t

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled, over gloo; tensors inside should be on the CPU)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision on every rank (a CPU broadcast: no CUDA sync)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        tdist.broadcast(t, src=0)
        return bool(t.item())

    def _rank0_then_all(self, fn: Callable[[], Any], share: bool) -> Any:
        """fn() on rank 0 only, then a broadcast every rank waits for (so also a barrier): rank 0's
        result (if `share`), or the UserError rank 0 raised, raised on every rank."""
        result = error = None
        if self.is_main:
            try:
                result = fn()
            except UserError as exc:
                error = exc
        sent, error = self.broadcast_object((result if share else None, error))
        if error is not None:
            raise error
        return result if self.is_main else sent

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 only and hand its result to every rank; a UserError raised by rank 0 is
        raised on every rank (so all ranks stop together, with the same message)."""
        if not self.enabled:
            return fn()
        return self._rank0_then_all(fn, share=True)

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0, then on the other ranks: what rank 0 caches on disk (an image folder
        decoded once) the others then read instead of redoing.  A UserError on rank 0 stops every rank."""
        if not self.enabled:
            return fn()
        result = self._rank0_then_all(fn, share=False)
        return result if self.is_main else fn()

    def broadcast_module(self, module: torch.nn.Module, buffers_only: bool = False):
        """Copy rank 0's parameters and buffers (or only buffers, e.g. BatchNorm running statistics)
        into every rank's `module`, in place."""
        if not self.enabled:
            return
        tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
        with torch.no_grad():
            for t in tensors:
                tdist.broadcast(t.data, src=0)

    def weight_spread(self, module: torch.nn.Module) -> float:
        """max over parameters of (max − min across ranks) of three checksums per tensor (sum, sum of
        squares, position-weighted sum), in float64.  DDP keeps replicas bit-identical: 0.0 expected."""
        if not self.enabled:
            return 0.0
        sums = []
        with torch.no_grad():
            for p in module.parameters():
                v = p.detach().double().flatten()
                pos = torch.arange(1, v.numel() + 1, device=v.device, dtype=torch.float64) / v.numel()
                sums += [v.sum(), (v * v).sum(), (v * pos).sum()]
            s = torch.stack(sums)
            both = torch.cat([s, -s])
            self.all_reduce_max(both)
            n = s.numel()
            return float((both[:n] + both[n:]).max().item())  # max − min per checksum


class ShardedLoader:
    """This rank's equal, contiguous slice of every global batch of `loader` (any loader with
    epoch(epoch, start_step) and __len__: DeviceLoader or DaliLoader).

    Every rank draws the whole global batch (one gather and a batched augmentation: cheap next to
    the model) and keeps its slice, so the union of the ranks' slices is exactly the batch of the
    single-process run.  A batch not divisible by the world size (only when the whole training set
    is smaller than --batch-size) loses its last `len % world` samples."""

    def __init__(self, loader, rank: int, world_size: int):
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        return self.loader.num_samples

    def shard(self, x: torch.Tensor, y: torch.Tensor):
        per = x.shape[0] // self.world_size
        lo = self.rank * per
        return x[lo:lo + per], y[lo:lo + per]

    def epoch(self, epoch: int = 0, start_step: int = 0):
        for x, y in self.loader.epoch(epoch, start_step):
            yield self.shard(x, y)

    def __iter__(self):
        return self.epoch(0)


def shard_range(n: int, rank: int, world_size: int):
    """[lo, hi) of rank's contiguous share of n items (sizes differ by at most one): evaluation."""
    return rank * n // world_size, (rank + 1) * n // world_size


def init(timeout_minutes: float = 30.0) -> DistContext:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK, or a no-op context when
    WORLD_SIZE is unset or 1."""
    if "WORLD_SIZE" not in os.environ:
        return DistContext()
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (they are set by torchrun)") from None
    if world <= 1:
        return DistContext()
    if not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} outside [0, WORLD_SIZE={world})")
    if not tdist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run without torchrun")
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ConfigError("WORLD_SIZE is set but MASTER_ADDR/MASTER_PORT are not: launch with torchrun")
    cuda = torch.cuda.is_available() and tdist.is_nccl_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if cuda and local < torch.cuda.device_count():
        torch.cuda.set_device(local)  # NCCL needs each process on its own device before the first call
    tdist.init_process_group(backend=backend, rank=rank, world_size=world,
                             timeout=timedelta(minutes=timeout_minutes))
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=backend)


def shutdown(ctx: DistContext):
    """destroy_process_group, if this process joined one (called at exit, also after errors)."""
    if ctx.enabled and tdist.is_initialized():
        tdist.destroy_process_group()
