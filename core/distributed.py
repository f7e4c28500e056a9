"""torchrun support: one process per GPU (or CPU process with gloo in tests)."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this call created the process group: its cleanup ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():  # else a caller (scoring, which runs several extractors) owns it
        use_nccl = torch.cuda.is_available() and device_preference != "cpu"
        if use_nccl:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if use_nccl else "gloo")
        info.owns_group = True
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and info.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def init_device(preference: str = "auto", precision: str = "auto"):
    """(DistInfo, device, autocast dtype) for this process: under torchrun each rank takes its GPU."""
    import torch

    from core.runtime import amp_dtype, pick_device

    dist = init_distributed(preference)
    device = pick_device(preference)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    return dist, device, amp_dtype(device, precision)


def from_main(info: DistInfo, value):
    """Rank 0's `value` (any picklable object) on every rank; `value` itself without torchrun."""
    if not info.enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def judge_epoch(info: DistInfo, score: float, best: float, bad_epochs: int) -> tuple[bool, float, int]:
    """(improved, best, bad_epochs) after an epoch whose selection figure is `score`, decided on rank 0
    from its own figure and broadcast: ranks whose figures differ (a float that rounds differently,
    a rank that sees other rows) would otherwise keep different checkpoints or stop at different
    epochs, and the rank still training would wait forever in a collective."""
    improved = score < best
    return from_main(info, (improved, score if improved else best, 0 if improved else bad_epochs + 1))
