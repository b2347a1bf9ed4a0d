"""Running input Hessians ``H = 2 Xᵀ X / n`` for GPTQ, one per expert (or one per module).

Normalisation: the accumulator keeps the plain weighted sum ``S = Σ_t w_t x_t x_tᵀ`` and
:meth:`HessianAccumulator.hessian` returns ``H = 2 S / Σ_t w_t``, the GPTQ paper's ``2 X Xᵀ``
averaged over tokens (with ``w_t = 1`` exactly the reference ``2/n Σ x xᵀ``). Averaging keeps the
scale of ``H`` independent of how many tokens an expert saw; GPTQ itself is invariant to that scale
because its damping is a fraction of ``mean(diag H)``.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates ``Σ w x xᵀ`` for ``num`` matrices (the experts of a layer, or 1 module).

    Attributes:
        xtx: float ``[num, K, K]``, the running weighted sum ``S`` (not normalised).
    """

    def __init__(
        self, num: int, k: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ):
        if num < 1 or k < 1:
            raise ValueError(f"HessianAccumulator needs num >= 1 and k >= 1, got num={num}, k={k}")
        self.num = num
        self.k = k
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.xtx = torch.zeros(num, k, k, device=self.device, dtype=dtype)
        self._tokens = torch.zeros(num, dtype=torch.int64, device=self.device)
        self._weight_sum = torch.zeros(num, dtype=torch.float64, device=self.device)
        self._finished = False

    @property
    def tokens(self) -> torch.Tensor:
        """int64 ``[num]``: rows added per matrix (a weighted row counts as one row)."""
        return self._tokens.clone()

    @property
    def weight_sum(self) -> torch.Tensor:
        """float64 ``[num]``: sum of the row weights per matrix (equals ``tokens`` when unweighted)."""
        return self._weight_sum.clone()

    def add(self, x: torch.Tensor, index: int = 0, weight: torch.Tensor | None = None) -> None:
        """Add rows of inputs to matrix ``index``.

        Args:
            x: ``[T, K]`` inputs (or ``[..., K]``, flattened to rows).
            index: which matrix (expert) the rows belong to.
            weight: optional non-negative ``[T]`` per-row weights (e.g. routing probabilities).
        """
        self._check_open()
        if not 0 <= index < self.num:
            raise IndexError(f"index {index} out of range for {self.num} matrices")
        x = self._rows(x)
        t = x.shape[0]
        if weight is None:
            if t:
                self.xtx[index].addmm_(x.T, x)
            self._tokens[index] += t
            self._weight_sum[index] += t
            return
        w = self._weights(weight, t)
        if t:
            xs = x * w.sqrt().to(x.dtype)[:, None]
            self.xtx[index].addmm_(xs.T, xs)
        self._tokens[index] += t
        self._weight_sum[index] += w.sum(dtype=torch.float64)

    def hessian(self, inplace: bool = False) -> torch.Tensor:
        """The normalised Hessians ``H = 2 S / Σ w``, ``[num, K, K]``.

        A matrix that received no weight gets ``H = 0``. With ``inplace=True`` the stored sum is
        scaled in place and returned (no second ``[num, K, K]`` buffer); the accumulator is closed
        afterwards.
        """
        scale = torch.where(self._weight_sum > 0, 2.0 / self._weight_sum.clamp(min=1e-300), 0.0)
        scale = scale.to(self.dtype)[:, None, None]
        if inplace:
            self._finished = True
            return self.xtx.mul_(scale)
        return self.xtx * scale

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.k:
            raise ValueError(f"inputs have {x.shape[-1]} features, the accumulator expects {self.k}")
        return x.reshape(-1, self.k).to(device=self.device, dtype=self.dtype)

    def _weights(self, weight: torch.Tensor, t: int) -> torch.Tensor:
        w = weight.reshape(-1).to(device=self.device, dtype=self.dtype)
        if w.shape[0] != t:
            raise ValueError(f"weight has {w.shape[0]} entries for {t} rows")
        if t and not bool((w >= 0).all()):
            raise ValueError("row weights must be non-negative")
        return w

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(
                "this Hessian accumulator was finalised with hessian(inplace=True); create a new one"
            )
