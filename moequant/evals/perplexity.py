"""Next-token NLL and perplexity, with a standard error over windows.

Protocol: the whole evaluation text is tokenised once without special tokens and cut into
consecutive non-overlapping windows of ``seqlen`` tokens (the remainder is dropped). Each window is
scored on its own, from an empty context: position ``t`` predicts token ``t + 1``, so a window of
``L`` tokens contributes ``L - 1`` predictions. Perplexity is ``exp`` of the mean NLL (in nats) of
every predicted token.
"""

from __future__ import annotations

import math

import torch


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL (nats) of each target under ``logits``.

    Args:
        logits: ``[..., V]`` unnormalised scores; computed in float32 at least.
        targets: ``[...]`` int64 token ids, same leading shape.

    Returns:
        ``[...]`` float32 ``-log softmax(logits)[target]``.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def next_token_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """NLL of every next token of every window: ``logits [W, L, V]``, ``windows [W, L]`` -> ``[W, L-1]``."""
    return token_nll(logits[:, :-1], windows[:, 1:])


def perplexity(nll: torch.Tensor) -> float:
    """``exp(mean NLL)`` over every predicted token of ``nll [W, T]`` (any shape)."""
    return math.exp(float(nll.double().mean()))


def perplexity_stderr(nll: torch.Tensor) -> float | None:
    """Standard error of :func:`perplexity` over windows, by the delta method.

    With per-window mean NLLs ``m_w`` (rows of ``nll [W, T]``), the mean NLL ``m`` has standard
    error ``s = std(m_w, ddof=1) / sqrt(W)``, and ``exp`` carries it to ``exp(m) * s``. Windows of
    equal length make ``m`` the mean over all tokens. ``None`` for fewer than two windows.
    """
    per_window = nll.double().reshape(nll.shape[0], -1).mean(dim=1)
    w = per_window.numel()
    if w < 2:
        return None
    se = float(per_window.std(unbiased=True)) / math.sqrt(w)
    return math.exp(float(per_window.mean())) * se
