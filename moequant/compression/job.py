"""What every layer of one compression run shares: the source, the plan, the device, and a clock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from moequant.arch.base import Architecture, WeightGetter
from moequant.checkpoint.output_form import OutputForm
from moequant.checkpoint.reader import CheckpointReader
from moequant.compression.parallel import Group
from moequant.progress import Progress
from moequant.quant.types import QuantSpec
from moequant.recipe import Recipe


@dataclass
class Phases:
    """Seconds per phase (read, hessians, solve, pack, ...) of the layer being compressed."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Add the time spent inside to phase ``name``, device work finished at both ends."""
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Job:
    """One compression run's settings: the source, its family, the recipe and the spec of every module.

    ``windows`` is the number of calibration windows per forward chunk; ``expert_batch`` the
    number of experts read and solved together; ``form`` how the output is stored; ``group`` this
    process's place among the ranks of an expert-parallel run; ``unread`` the weights the current
    layer leaves to other ranks (read as uninitialised placeholders of their shape).
    """

    reader: CheckpointReader
    arch: Architecture
    recipe: Recipe
    specs: dict[str, QuantSpec | None]
    device: torch.device
    progress: Progress
    windows: int
    expert_batch: int
    form: OutputForm = field(default_factory=OutputForm)
    group: Group = field(default_factory=Group)
    unread: set[str] = field(default_factory=set)
    phases: Phases = field(init=False)

    def __post_init__(self) -> None:
        self.phases = Phases(self.device)

    def weights(self) -> WeightGetter:
        """``get(name)``: a source tensor in float32 on the job's device, refused if not finite (timed as read)."""

        def get(name: str) -> torch.Tensor:
            if name in self.unread:
                return torch.empty(self.reader.shape(name), dtype=torch.float32, device=self.device)
            with self.phases("read"):
                return self.reader.get(name, dtype=torch.float32, device=self.device, check_finite=True)

        return get
