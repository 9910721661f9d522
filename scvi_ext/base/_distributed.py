"""Which process this is under Lightning's DDP, and file writing done once.

With ``model.train(..., devices=2, strategy="ddp")`` Lightning starts the user's script
again for every other rank: each line after training runs once per process, and the
process group stays up until the script ends. Writing files (``model.save``) must then
happen on rank 0 only, while the other ranks wait until it is done, so that none of them
reads a half-written folder (:func:`on_main_process`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_only

Result = TypeVar("Result")

#: Set while rank 0 runs a function of :func:`on_main_process`: nested calls run directly.
_RUNNING_ON_MAIN = False


def distributed_world() -> bool:
    """Whether a torch process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_rank() -> int:
    """This process's rank among all processes: 0 outside DDP.

    Read from the process group once it exists, else from the environment variables the
    launcher sets (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``, as Lightning reads them), so
    that a process Lightning started knows its rank before training begins.
    """
    if distributed_world():
        return dist.get_rank()
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_main_process() -> bool:
    """Whether this is rank 0, the process that writes files."""
    return global_rank() == 0


def barrier() -> None:
    """Wait until every process gets here; returns at once outside DDP.

    Every rank must call it (as every rank runs the same script): a barrier reached by
    rank 0 alone waits for the others until the process group's timeout.
    """
    if distributed_world():
        dist.barrier()


def on_main_process(function: Callable[..., Result], *args, **kwargs) -> Result | None:
    """``function(*args, **kwargs)`` on rank 0 only; the other ranks wait for it to finish.

    Outside DDP it simply runs. Under DDP every rank must call it (as every rank runs the
    same script); the other ranks return ``None``, or raise the error ``function`` raised on
    rank 0 (e.g. scvi's "already exists" ``ValueError`` of ``save``), so that every process
    sees the same outcome. Calls nested inside ``function`` run directly.
    """
    global _RUNNING_ON_MAIN
    if _RUNNING_ON_MAIN or not distributed_world():
        return function(*args, **kwargs)
    result, error = None, None
    if dist.get_rank() == 0:
        _RUNNING_ON_MAIN = True
        try:
            result = function(*args, **kwargs)
        except Exception as exception:  # sent to the other ranks, then raised here
            error = exception
        finally:
            _RUNNING_ON_MAIN = False
    message = [_picklable(error)]
    dist.broadcast_object_list(message, src=0)  # the others wait here for rank 0
    if error is not None:
        raise error
    if message[0] is not None:
        raise message[0]
    return result


def _picklable(error: Exception | None) -> Exception | None:
    """``error``, or a ``RuntimeError`` with its text when it cannot be sent to other ranks."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__} on rank 0: {error}")
    return error


__all__ = [
    "barrier",
    "distributed_world",
    "global_rank",
    "is_main_process",
    "on_main_process",
]
