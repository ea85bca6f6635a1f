"""Several processes, one run: ``torchrun`` + DistributedDataParallel, never a launcher of our own.

``torchrun --nproc-per-node N -m compressor run ...`` starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK set; :func:`setup` joins them into one process group (NCCL on
GPUs, gloo on CPUs). Every rank then runs the same code on the same data order:
- training splits each global batch of ``--batch-size`` images across the ranks (the
  shuffle, crops and flips come from one shared seed, so the ranks together see exactly
  what one process would) and DDP averages the gradients;
- evaluation splits the images and all-reduces the counts, so accuracy is the whole split's;
- criteria run on every rank from identical weights, and rank 0's plan is broadcast and
  checked against each rank's own (a difference is reported, and rank 0's is used);
- only rank 0 writes files; the others wait for it where they read them back.
With one process (no torchrun) every function here is a no-op.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import CompressorError


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True when torchrun (or another launcher with its environment) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restarted() -> bool:
    """True when torchrun's elastic agent restarted the workers (``--max-restarts``): continue, don't redo."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def setup(device: torch.device) -> torch.device:
    """Join the process group if launched by torchrun; return this rank's device."""
    if not launched() or active():
        return _local_device(device)
    if not dist.is_available():
        raise CompressorError("this torch build has no torch.distributed; run one process")
    device = _local_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(minutes=30)
    store = _restart_scoped_store(timeout)
    if store is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    return device


def _restart_scoped_store(timeout: timedelta):
    """torchrun's store with a key space of this restart's own, or None to let torch make the store.

    torchrun's elastic agent hosts the store the ranks meet in (MASTER_ADDR:MASTER_PORT,
    ``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps that one store across its restarts, while
    ``init_process_group`` uses the same keys in every round. So a restarted rank can read a key the
    previous round left: gloo's "0" and "1" hold each rank's listening address, and a rank that
    reads its peer's old one either connects to a dead port ("connectFullMesh failed ... Connection
    refused") or waits for a connection that never comes (both sides decide to listen) until the
    timeout. docs/torchrun.md has the evidence and docs/torchrun_restart_repro.py a reproduction.
    Keys under ``attempt_<TORCHELASTIC_RESTART_COUNT>/`` are new in each round, as torch's own env://
    rendezvous made them up to 2.3 (pytorch/pytorch#135712 is the same bug with NCCL). The count is
    the same on every rank only when one agent restarts them all: one node (``--standalone``, or any
    job whose ranks are all local). Across nodes each agent counts for itself, so there torch's own
    store is left alone; launch with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` there (docs/torchrun.md).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None  # not torchrun's shared store: each round gets a store of its own
    if os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
        return None  # several nodes: their restart counts can differ
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def quiet_others() -> None:
    """Progress lines from rank 0 only: the ranks print the same things."""
    if not is_main():
        import sys

        sys.stdout = open(os.devnull, "w")


def _local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def teardown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj) -> list:
    """Every rank's ``obj``, in rank order."""
    if not active():
        return [obj]
    boxes = [None] * world()
    dist.all_gather_object(boxes, obj)
    return boxes


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        t = t.clone()
        dist.all_reduce(t)
    return t


def shard(n: int) -> slice:
    """This rank's share of ``n`` items: contiguous and equal (the last rank may get fewer)."""
    per = -(-n // world())
    return slice(min(rank() * per, n), min((rank() + 1) * per, n))


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model for training: DDP around it when several ranks train, else itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
