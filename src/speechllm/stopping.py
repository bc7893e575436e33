"""Stop requests from the batch system, honoured at points where the work done so far is on disk.

A resumable step (training, target and response generation, evaluation shards) calls `install()`; from then
on SIGTERM and SIGUSR1 only record the request. The step's loop calls `check()` right after it has saved its
progress (a checkpoint after an optimizer update, a finished batch appended to a partial file); `check()` then
raises `Preempted`, which ends the process with status 75 (EX_TEMPFAIL, "try again"). Snakemake counts the
non-zero status as a failed attempt and retries the job (the Slurm profile lists these rules as preemptible,
with enough retries), and the retry resumes from what was saved.

SIGTERM is what Slurm sends at a job's time limit, on preemption and on `scancel` (then SIGKILL after
KillWait seconds), and what the rules ask for ahead of the limit (`sbatch --signal=TERM@<seconds>`,
config `resources.stop_signal_seconds`). SIGTERM, not SIGUSR1, because Snakemake's job wrapper in the Slurm
step handles SIGTERM by waiting for its running job, while SIGUSR1 kills it at once (which ends the step and
with it the saving process). SIGUSR1 is honoured too, for a job run by hand (`kill -USR1 <pid>`).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

log = logging.getLogger("speechllm")

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, the same call can be retried
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[int] = []


class Preempted(SystemExit):
    """A stop signal arrived and the progress so far is saved: exit with `PREEMPTED_EXIT` for a retry."""

    def __init__(self, saved: str) -> None:
        super().__init__(PREEMPTED_EXIT)
        self.saved = saved


def _record(signum: int, frame: FrameType | None) -> None:
    # Only record: the loop decides when it is safe to stop (no logging here, it may hold locks).
    _received.append(signum)


def install() -> None:
    """Turn SIGTERM and SIGUSR1 into stop requests for this process (call from the main thread)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def requested() -> str | None:
    """The name of the first stop signal received, or None."""
    return signal.Signals(_received[0]).name if _received else None


def check(saved: str) -> None:
    """Raise `Preempted` if a stop signal came; call where `saved` describes the progress now on disk."""
    name = requested()
    if name is not None:
        log.warning(
            "%s received: %s; exiting with status %d so that the retried job resumes",
            name,
            saved,
            PREEMPTED_EXIT,
        )
        raise Preempted(saved)


def reset() -> None:
    """Forget received signals (tests that run several steps in one process)."""
    _received.clear()
