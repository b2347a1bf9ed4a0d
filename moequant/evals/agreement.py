"""How closely a model follows its baseline: KL divergence, top-1 and router agreement.

KL is taken of the model's next-token distribution from the baseline's, per token:
``KL(base || model) = sum_v p_base(v) * (log p_base(v) - log p_model(v))`` in nats, so it is zero
exactly where the two distributions agree and weighs the errors by what the baseline expects.
"""

from __future__ import annotations

import numpy as np
import torch


def kl_divergence(base_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(base || model)`` in nats: ``[..., V]`` twice -> ``[...]`` float32."""
    log_b = torch.log_softmax(base_logits.float(), dim=-1)
    log_m = torch.log_softmax(model_logits.float(), dim=-1)
    return (log_b.exp() * (log_b - log_m)).sum(dim=-1).clamp_min(0.0)


def top1_equal(base_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """Whether both argmax tokens agree: ``[..., V]`` twice -> bool ``[...]``."""
    return base_logits.argmax(dim=-1) == model_logits.argmax(dim=-1)


def topk_sets_equal(ids_a: torch.Tensor, ids_b: torch.Tensor) -> torch.Tensor:
    """Whether two routings chose the same expert SET per token: ``[T, k]`` twice -> bool ``[T]``.

    The order within the top-k does not matter.
    """
    a, _ = ids_a.sort(dim=-1)
    b, _ = ids_b.sort(dim=-1)
    return (a == b).all(dim=-1)


def router_agreement(ids_a: torch.Tensor, ids_b: torch.Tensor) -> float:
    """Share of tokens whose top-k expert set is equal in both routings (``[T, k]`` each)."""
    return float(topk_sets_equal(ids_a, ids_b).double().mean())


def summarize(values: torch.Tensor) -> dict[str, float]:
    """``mean``, ``median`` and ``p99`` of all elements of ``values`` (any shape)."""
    arr = values.detach().double().flatten().cpu().numpy()
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "p99": float(np.quantile(arr, 0.99))}
