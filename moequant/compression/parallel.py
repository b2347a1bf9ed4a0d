"""Expert-parallel compression over torch.distributed: the ranks, who solves which expert, sharing the results.

Under ``torchrun --nproc-per-node N -m moequant compress ...`` every rank runs the same layer
forward on the same calibration windows (each computes them: no activations cross between
ranks) and solves attention and the dense and shared MLPs alike, so all hold the same hidden
states. A MoE layer's experts are dealt to the ranks by their cost (tokens routed and sizes); a
rank reads and solves only its own and leaves the others' weights unread, then every expert's
packed tensors are broadcast from the rank that solved it, and the others dequantise them (the
weights the forward goes on with, bit for bit those of the solver) before the layer's output is
computed. Rank 0 gathers the records and writes the checkpoint, which is the single-process
one byte for byte. NCCL carries the tensors between GPUs, gloo between CPU processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moequant.errors import MoequantError
from moequant.packed.shapes import packed_shapes
from moequant.packed.widths import PACKED_KEYS
from moequant.quant.pack import unpack_result
from moequant.quant.types import QuantSpec

_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32}


@dataclass(frozen=True)
class Group:
    """This process's ``rank`` among ``world`` processes (1: no torch.distributed), and where collectives
    exchange tensors (``comm``: ``cuda:LOCAL_RANK`` under NCCL, else ``cpu``)."""

    rank: int = 0
    world: int = 1
    comm: torch.device = torch.device("cpu")

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for alone)."""
        if self.world > 1:
            dist.barrier()

    def device(self, asked: torch.device) -> torch.device:
        """The device this rank computes on: its own GPU where ``asked`` is CUDA."""
        if self.world > 1 and asked.type == "cuda":
            return self.comm
        return asked


def current() -> Group:
    """The process group torchrun set up for this process (initialised here on first use), or a single one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group("nccl" if cuda else "gloo")
        except (RuntimeError, ValueError) as exc:
            raise MoequantError(f"cannot join the torchrun process group ({exc}); start every rank with the same "
                                "torchrun command") from exc
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return Group(dist.get_rank(), dist.get_world_size(), comm)


def deal(costs: Mapping[int, float], world: int) -> dict[int, int]:
    """The rank of every expert: the costliest first, each to the rank with the least work so far."""
    load = [0.0] * world
    owner = {}
    for e in sorted(costs, key=lambda e: (-costs[e], e)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[e] = rank
        load[rank] += costs[e]
    return owner


def expert_cost(rows: int, hidden: int, inter: int) -> float:
    """What solving one expert costs: its Hessians over ``rows`` tokens, and GPTQ on its three matrices."""
    return rows * (hidden * hidden + inter * inter) + 2 * inter * hidden * hidden + hidden * inter * inter


def share_experts(group: Group, owner: Mapping[int, int], names: Mapping[int, Mapping[str, str]],
                  specs: Mapping[str, QuantSpec | None], shapes: Mapping[str, tuple[int, int]],
                  tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Broadcast every quantised expert linear's packed tensors from its ``owner`` rank, one buffer per rank.

    ``names[e]`` maps expert ``e``'s roles to module names, ``shapes`` the modules to ``[N, K]``. The
    owner's tensors come from ``tensors``; the others' are put there. Returns the dequantised
    weights (float32, on the CPU) of the modules this rank did not solve, and the bytes broadcast.
    """
    received = []
    sent = 0
    for rank in range(group.world):  # every buffer first, so that no rank dequantises while another waits
        parts = [(name, key, shape, spec.bits) for e in sorted(owner) if owner[e] == rank
                 for name in names[e].values() if (spec := specs[name]) is not None
                 for key, shape in packed_shapes(*shapes[name], spec.bits, spec.group_size).items()]
        if not parts:
            continue
        sizes = [math.prod(shape) * _DTYPES[key].itemsize for _, key, shape, _ in parts]
        if rank == group.rank:
            buffer = torch.cat([tensors[f"{name}.{key}"].contiguous().view(torch.uint8).flatten()
                                for name, key, _, _ in parts]).to(group.comm)
        else:
            buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=group.comm)
        dist.broadcast(buffer, src=rank)
        sent += buffer.numel()
        if rank != group.rank:
            received.append((parts, sizes, buffer.cpu()))
    dequantised = {}
    for parts, sizes, buffer in received:
        packed: dict[str, dict[str, torch.Tensor]] = {}
        for (name, key, shape, _), chunk in zip(parts, torch.split(buffer, sizes), strict=True):
            packed.setdefault(name, {})[key] = chunk.clone().view(_DTYPES[key]).reshape(shape)
        for name, bits in dict.fromkeys((n, b) for n, _, _, b in parts):
            tensors.update({f"{name}.{key}": packed[name][key] for key in PACKED_KEYS})
            dequantised[name] = unpack_result(packed[name], bits).dequantize()
    return dequantised, sent


def gather_records(group: Group, records: dict[str, dict]) -> dict[str, dict]:
    """Every rank's module records, on every rank."""
    parts: list[dict[str, dict] | None] = [None] * group.world
    dist.all_gather_object(parts, records)
    return {name: rec for part in parts for name, rec in (part or {}).items()}
