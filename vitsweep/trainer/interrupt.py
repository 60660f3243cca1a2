"""Stopping a job on a signal without losing its state.

SIGTERM (`kill`, `docker stop`, schedulers) and SIGINT (Ctrl-C) do not end a job where it stands:

- during training (`Trainer.fit` inside `at_step_boundaries()`), the signal is noted; the running
  optimizer step (or the running validation) finishes, the loop saves last.pt at that step (mid-epoch,
  so a resume continues exactly there) and raises Interrupted;
- anywhere else (decoding data, scoring the test split, drawing figures) Interrupted is raised at once:
  nothing there is worth a checkpoint.

vitsweep.run.job then records the status `interrupted`, finishes the W&B run, prints one line and exits with
128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM). A second signal while that happens aborts
at once, with the same exit code and nothing more written.

Under submitit (hydra/launcher=slurm or submitit_local) SIGTERM keeps submitit's handler (it ignores
SIGTERM and acts on its preemption signal, USR2), and the preemption signal is handled as above, then
passed on to submitit, which requeues the job; the requeued attempt resumes from last.pt.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import NoReturn

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """The job was stopped by a signal; `where` says what was saved ("" when nothing was)."""

    def __init__(self, signum: int, where: str = ""):
        super().__init__(signum)
        self.signum, self.where = signum, where

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class _State:
    def __init__(self):
        self.requested: int | None = None  # the signal received, until the job has stopped
        self.deferring = False  # inside Trainer.fit: act at the next step boundary
        self.on_abort: Callable[[int], None] | None = None  # a last, quick record before a second signal's exit
        self.passed_on: dict[int, Callable] = {}  # submitit's preemption handler, called once the state is saved


_state = _State()


def requested() -> bool:
    """Whether a signal asks this job to stop (the training loop checks this after each step)."""
    return _state.requested is not None


def stop(where: str) -> NoReturn:
    """Raise Interrupted for the signal received; `where`: what the caller saved (e.g. the step)."""
    raise Interrupted(_state.requested or signal.SIGTERM, where)


@contextmanager
def at_step_boundaries() -> Iterator[None]:
    """Within this block a signal is acted on by the code that checks `requested()` (the training loop),
    at a point where its state can be saved whole."""
    outer, _state.deferring = _state.deferring, True
    try:
        yield
    finally:
        _state.deferring = outer
    if _state.requested is not None:  # came after the loop's last check (its final validation)
        stop("the end of training (last.pt saved)")


@contextmanager
def held() -> Iterator[None]:
    """Within this block a signal is noted, not acted on: a failed job is writing its record (under
    torchrun, the launcher's SIGTERM follows a dead rank's error by a fraction of a second, and must not
    cut summary.json's `failed` short). The caller goes on to exit; a second signal still aborts at once."""
    outer, _state.deferring = _state.deferring, True
    try:
        yield
    finally:
        _state.deferring = outer


def failure_behind(err: Interrupted) -> Exception | None:
    """The error the job was already failing with when the signal came (the signal was raised while that
    error unwound the stack), or None: a signal that stopped a job in good health."""
    context = err.__context__
    return context if isinstance(context, Exception) else None


def _abort(signum: int) -> NoReturn:
    os.write(2, f"aborted: second {signal.Signals(signum).name}; exiting now, nothing more is saved\n".encode())
    if _state.on_abort is not None:
        with suppress(BaseException):  # exiting regardless
            _state.on_abort(signum)
    os._exit(128 + signum)


def _handle(signum: int, frame) -> None:
    if _state.requested is not None:
        _abort(signum)
    _state.requested = signum
    if not _state.deferring:
        raise Interrupted(signum)


def _submitit_handler(handler) -> str | None:
    """The name of submitit's handler method (`bypass`, `checkpoint_and_try_requeue`), if it is one."""
    owner = getattr(handler, "__self__", None)
    if owner is not None and type(owner).__module__.startswith("submitit"):
        return getattr(handler, "__name__", "")
    return None


@contextmanager
def handled(on_abort: Callable[[int], None] | None = None) -> Iterator[None]:
    """Handle SIGINT, SIGTERM and submitit's preemption signal as the module says, for one job."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (a job run in a thread keeps the defaults)
        return
    signals = {signal.SIGINT, signal.SIGTERM}
    # submitit's preemption signal: USR2 unless SUBMITIT_PREEMPT_SIGNAL names another
    for name in {"SIGUSR2", "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")}:
        signum = getattr(signal, name, None)
        if signum is not None and _submitit_handler(signal.getsignal(signum)) == "checkpoint_and_try_requeue":
            signals.add(signum)
    previous = {}
    _state.requested, _state.on_abort, _state.passed_on = None, on_abort, {}
    for signum in signals:
        current = signal.getsignal(signum)
        if _submitit_handler(current) == "bypass":
            continue  # submitit ignores SIGTERM on purpose: its preemption signal follows
        if _submitit_handler(current) == "checkpoint_and_try_requeue":
            _state.passed_on[signum] = current
        previous[signum] = current
        signal.signal(signum, _handle)
    try:
        yield
    finally:
        if _state.requested is None:  # the job ended by itself: the next job of a sweep installs its own
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            _state.on_abort = None
        # else: the process is on its way out (128 + signal); a further signal, even during W&B's teardown
        # at exit, still aborts at once rather than printing a KeyboardInterrupt traceback
        _state.deferring = False


def on_abort(callback: Callable[[int], None]) -> None:
    """What a second signal does just before the process exits (a quick record: no I/O that may block)."""
    _state.on_abort = callback


def signals_handled(job: Callable) -> Callable:
    """Run `job` with the signals handled as this module says. An Interrupted that escapes `job` (it came
    before the job had a record to keep) still ends the process in one line with 128 + signal."""

    @functools.wraps(job)
    def wrapper(*args, **kwargs):
        with handled():
            try:
                return job(*args, **kwargs)
            except Interrupted as err:
                log.warning("interrupted by %s while the job was starting or ending: nothing to save", err.signal_name)
                exit_for(err)

    return wrapper


def will_requeue(err: Interrupted) -> bool:
    """Whether submitit requeues the job after this interruption (SLURM preemption or timeout)."""
    return err.signum in _state.passed_on


def exit_for(err: Interrupted) -> NoReturn:
    """End the process as the signal asks: submitit's requeue for its preemption signal, else exit with
    128 + signal. The job's record is written and its W&B run finished by now; the interpreter's own
    teardown (W&B's service, thread pools) can take seconds, during which Python has already put the
    default handlers back and a second Ctrl-C would kill it mid-way, so the process ends here."""
    passed_on = _state.passed_on.get(err.signum)
    if passed_on is not None:
        passed_on(err.signum, None)  # checkpoints the submission, requeues, exits
    logging.shutdown()  # flush run.log and the console
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(128 + err.signum)
