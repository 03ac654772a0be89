"""Fused LM-head kernels and their autograd function.

Backends: ``torch`` (chunked reference, always available) and the optional native ones
(``cpu`` C++ extension, ``triton``, ``cuda``), each registering itself on import when present.
"""

from . import torch_chunked  # noqa: F401  (registers the "torch" backend)
from . import triton_backend  # noqa: F401  (registers "triton"; imports triton lazily, so never fails without it)
try:  # C++ CPU backend: registers "cpu"; builds lazily on first use, never at import
    from . import cpu_backend
except Exception as _exc:  # pragma: no cover - a broken optional backend must not break the package
    import logging as _logging
    _logging.getLogger("fdiv_kernels").warning("fdiv_kernels: cpu backend not registered: %s", _exc)
try:  # CUDA backend: registers "cuda"; needs nvcc + a GPU, checked lazily on first use
    from . import cuda_backend  # noqa: F401
except Exception as _exc:  # pragma: no cover
    import logging as _logging
    _logging.getLogger("fdiv_kernels").warning("fdiv_kernels: cuda backend not registered: %s", _exc)
from .backends import Backend, available_backends, get_backend, register_backend
from .token_stats import TokenStats, TokenStatsFunction, TokenStatsParams, token_stats, token_stats_from_logits


def release_workspaces() -> None:
    """Free the buffers backends keep between calls (the ``cpu`` backend's chunk workspace)."""
    try:
        cpu_backend.release_workspace()
    except NameError:  # pragma: no cover - cpu backend not registered
        pass


__all__ = [
    "Backend", "TokenStats", "TokenStatsFunction", "TokenStatsParams", "available_backends", "get_backend",
    "register_backend", "release_workspaces", "token_stats", "token_stats_from_logits",
]
