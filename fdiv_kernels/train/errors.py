"""The trainer's error types: :mod:`fdiv_kernels.errors` (shared with the analysis tools), kept
under this name for callers that import it from here."""

from ..errors import (  # noqa: F401  (re-exported)
    CheckpointError,
    ConfigError,
    DataError,
    ResumeMismatchError,
    RunDirectoryError,
    TrainError,
    TrainingInterrupted,
)
