"""The one error type users see for bad input (exit code 2)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad config, data, model dir or CLI input.

    Raised before any process group starts; the CLI prints the message and exits with
    :data:`EXIT_USAGE`. The message must name the file/line or key and say how to fix it.
    """


EXIT_USAGE = 2
# Stopped on SIGTERM/SIGUSR1 after saving a checkpoint: requeue and resume (EX_TEMPFAIL, "try again").
EXIT_PREEMPTED = 75
# A non-finite loss stopped the run; the last good checkpoint is kept.
EXIT_NONFINITE = 3
# A checkpoint could not be written (disk full, quota, I/O error); the previous checkpoint stays `latest`
# (EX_IOERR).
EXIT_CHECKPOINT_WRITE = 74
# The hang watchdog ended a rank that made no progress for train.hang_timeout_s; requeue and resume like 75.
EXIT_HUNG = 76


class Preempted(Exception):
    """All ranks agreed to stop at a step boundary after a signal; a checkpoint was saved."""

    def __init__(self, step: int, signame: str, checkpoint: str | None) -> None:
        saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (stopped before the first step)"
        super().__init__(f"stopped by {signame} after step {step}; {saved}; resume with train.resume=auto")
        self.step = step


class RunFinished(Exception):
    """Nothing to do: the run to resume has ended for good (early stopping); exit 0 with the reason."""


class NonFiniteLoss(Exception):
    """NaN/inf loss at an optimizer step."""


class CheckpointWriteError(Exception):
    """Some rank could not write its part of a checkpoint; every rank raises it together."""
