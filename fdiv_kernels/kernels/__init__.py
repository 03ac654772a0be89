"""The kernels layer: the backends behind one contract (:mod:`.backends`).

``torch`` (chunked reference, always available, :mod:`.torch_chunked`) and the optional native
ones (``cpu``: the C++ extension, :mod:`.cpu_backend`; ``triton``: :mod:`.triton_backend`;
``cuda``: :mod:`.cuda_backend`), each registering itself here. A backend is a pure kernel: it
receives validated, contiguous tensors of the supervised rows only (the autograd layer,
:mod:`fdiv_kernels.autograd`, does that once for all of them) and imports nothing above this layer.
"""

import logging

from . import torch_chunked  # noqa: F401  (registers the "torch" backend)
from . import triton_backend  # noqa: F401  (registers "triton"; imports triton lazily, so never fails without it)
from . import distill_chunks  # noqa: F401  (distillation kernels of the torch backend; the native ones below)
from . import distill_triton  # noqa: F401  (the triton backend's; its kernels import triton on first use)
from .backends import Backend, available_backends, backend_names, get_backend, register_backend, resolve_backend

_logger = logging.getLogger("fdiv_kernels")
try:  # C++ CPU backend: registers "cpu"; builds lazily on first use, never at import
    from . import cpu_backend
    from . import distill_cpu  # noqa: F401  (its distillation kernels)
except Exception as _exc:  # pragma: no cover - a broken optional backend must not break the package
    cpu_backend = None
    _logger.warning("fdiv_kernels: cpu backend not registered: %s", _exc)
try:  # CUDA backend: registers "cuda"; needs nvcc + a GPU, checked lazily on first use
    from . import cuda_backend  # noqa: F401
    from . import distill_cuda  # noqa: F401  (its distillation kernels)
except Exception as _exc:  # pragma: no cover
    _logger.warning("fdiv_kernels: cuda backend not registered: %s", _exc)


def release_workspaces() -> None:
    """Free the buffers backends keep between calls (the ``cpu`` backend's chunk workspace)."""
    if cpu_backend is not None:
        cpu_backend.release_workspace()


__all__ = ["Backend", "available_backends", "backend_names", "get_backend", "register_backend", "release_workspaces",
           "resolve_backend"]