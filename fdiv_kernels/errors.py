"""The error types of the package's tools (``fdiv-train``, ``fdiv-analyze``), for callers that
catch them (the command lines map them to exit codes). ``fdiv_kernels.train.errors`` is the
same module under its old name.

::

    TrainError                      base of everything below
    ├── ConfigError (ValueError)    a bad value, path or file in the configuration: exit 2
    │   ├── DataError               a malformed data file or row (names the file and line)
    │   ├── RunDirectoryError       the run directory holds a run (no --resume / --overwrite)
    │   └── ResumeMismatchError     --resume with a changed configuration (no --allow-config-change)
    ├── CheckpointError (RuntimeError)  a save that did not write the weights, a damaged checkpoint
    └── TrainingInterrupted         SIGINT: a checkpoint was saved; exit 130
"""

from __future__ import annotations


class TrainError(Exception):
    """Base class of the reference trainer's own errors."""


class ConfigError(TrainError, ValueError):
    """A configuration value, path or file the run cannot use; the message names it."""


class DataError(ConfigError):
    """A malformed data file or row; the message names the file and line."""


class RunDirectoryError(ConfigError):
    """The run directory already holds a run, and neither ``--resume`` nor ``--overwrite`` was given."""


class ResumeMismatchError(ConfigError):
    """``--resume`` with a configuration that differs from the run's (without ``--allow-config-change``)."""


class CheckpointError(TrainError, RuntimeError):
    """A checkpoint that was not written completely, or is damaged; the message names the file."""


class TrainingInterrupted(TrainError):
    """Training stopped on SIGINT after saving ``checkpoint`` at ``step`` of ``phase``."""

    def __init__(self, phase: str, step: int, checkpoint: str):
        super().__init__(f"interrupted in {phase} at step {step}; checkpoint saved to {checkpoint}")
        self.phase, self.step, self.checkpoint = phase, step, checkpoint
