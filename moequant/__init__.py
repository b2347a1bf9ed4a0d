"""moequant: low-bit GPTQ compression of Mixture-of-Experts language models.

``moequant.compress(model, out)`` writes a compressed checkpoint in the GPTQ layout;
``moequant.load(out)`` gives back a ``transformers`` model that runs from the packed weights.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "compress", "load"]


def compress(*args: Any, **kwargs: Any):
    """Compress a checkpoint; see :func:`moequant.compression.compress`."""
    from moequant.compression import compress as _compress

    return _compress(*args, **kwargs)


def load(*args: Any, **kwargs: Any):
    """Load a compressed checkpoint; see :func:`moequant.loading.load`."""
    from moequant.loading import load as _load

    return _load(*args, **kwargs)
