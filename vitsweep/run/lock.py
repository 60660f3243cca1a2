"""One process per job dir: `<job dir>/.lock`, held from before `resume=true` reads the dir until the job's
record is final (vitsweep.run.job.run_job takes it; under DDP rank 0 holds it, the followers write nothing).

Without it, two runs of one job dir (`resume=true` in two terminals, a resubmitted SLURM job while the old
one still runs) both train, write every epoch twice into metrics.jsonl and fail on each other's checkpoints.

The mechanism is `fcntl.flock` on `.lock`, with a record in it (pid, host, start time, SLURM job):
- the flock says whether the owner lives: the kernel drops it when its process ends, however it ends
  (SIGKILL, a crash), so a lock left by a dead process on this machine is taken over with no guessing
  from pids (which are reused);
- the record names the owner in the refusal, and decides where the flock cannot tell: a filesystem without
  flock (some cluster filesystems answer ENOLCK or ENOSYS: then a live pid on this host holds it), and an
  owner on another host, whose flock a network filesystem may not share. A lock taken on another host is
  taken over only by a later attempt of the same SLURM job (same SLURM_JOB_ID, higher
  SLURM_RESTART_COUNT: SLURM runs one attempt of a job at a time, so the earlier one is over or ending).
  Otherwise the refusal says to delete `.lock` if that run is gone.

The record is written in place, under the flock, in one write (then fsync, so that other hosts see it):
not by rename, because the flock belongs to the file's inode, and a rename would give the next process a
new inode to lock while the owner holds the old one. The file is removed when the job ends; a process that
opened it just before must then find the path gone, so it checks, after its flock, that the path is still
the file it locked.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vitsweep.logger.atomic_file import OutputWriteError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
REQUEUE_WAIT_S = 120.0  # how long a requeued SLURM attempt waits for the earlier one to let go (SLURM's
#                         KillWait is 30 s by default; a dead NFS client's lock outlives it by its lease, ~90 s)


class JobDirBusy(Exception):
    """Another live process runs this job dir: the message is the one-line refusal."""


@dataclass(frozen=True)
class Owner:
    """Who holds a job dir: the record in its `.lock`."""

    pid: int
    host: str
    since: str  # local time the lock was taken, "YYYY-MM-DD HH:MM:SS"
    slurm_job_id: str | None = None
    slurm_restart_count: int = 0

    @classmethod
    def this_process(cls) -> Owner:
        return cls(pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%Y-%m-%d %H:%M:%S"),
                   slurm_job_id=os.environ.get("SLURM_JOB_ID") or None,
                   slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT") or 0))

    @classmethod
    def read(cls, fd: int) -> Owner | None:
        """The record in the open lock file, or None when there is none (a new file, an owner mid-write)."""
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"null")
            return cls(**data) if isinstance(data, dict) else None
        except (ValueError, TypeError):
            return None

    def earlier_attempt_of(self, other: Owner) -> bool:
        """This record is an earlier attempt of `other`'s SLURM job: requeued, the job runs again."""
        return (self.slurm_job_id is not None and self.slurm_job_id == other.slurm_job_id
                and self.slurm_restart_count < other.slurm_restart_count)

    def is_gone(self, me: Owner, flock_works: bool) -> bool:
        """Whether this owner is over, as `me` can tell with the flock free (or not supported here)."""
        if self.host == me.host:  # the flock is reliable on one machine; without it, ask for the pid
            return flock_works or not pid_alive(self.pid)
        return self.earlier_attempt_of(me)  # another host: alive or not, it cannot be known from here

    def refusal(self, job_dir: Path, me: Owner) -> str:
        """The one line a second run prints."""
        job = f" (SLURM job {self.slurm_job_id})" if self.slurm_job_id else ""
        stop = (f"scancel {self.slurm_job_id}" if self.slurm_job_id
                else f"kill -TERM {self.pid}" + (f" on {self.host}" if self.host != me.host else ""))
        line = (f"{job_dir} is being run by pid {self.pid} on {self.host}{job} since {self.since}: wait for it, "
                f"or stop it ({stop}; it saves last.pt) and run this again with resume=true")
        if self.host != me.host:
            line += f"; if that run is gone (its machine went down), delete {job_dir / LOCK_FILE}"
        return line


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def try_flock(fd: int) -> bool | None:
    """Take the flock without waiting: True, False when another open file holds it, None when this
    filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
            return None
        raise


def same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


class JobDirLock:
    """The lock of one job dir, held by this process from `acquire` to `release`."""

    def __init__(self, path: Path, fd: int, owner: Owner):
        self.path, self.fd, self.owner = path, fd, owner

    @classmethod
    def acquire(cls, job_dir: Path, wait_s: float = REQUEUE_WAIT_S) -> JobDirLock:
        """Take `job_dir`'s lock, or raise JobDirBusy naming the process that holds it. A lock whose owner
        is gone is taken over (see the module's docstring); a requeued SLURM attempt waits up to `wait_s`
        for the attempt before it to let go, and then takes over."""
        path, me = Path(job_dir) / LOCK_FILE, Owner.this_process()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise OutputWriteError(f"cannot create {path}: {err.strerror or err} (errno {err.errno}): fix the "
                                       f"folder's permissions") from None
            try:
                locked = try_flock(fd)
                if locked and not same_file(fd, path):
                    os.close(fd)  # its owner released and removed it between our open and our flock
                    continue
                owner = Owner.read(fd)
                if locked is False:  # a live process holds it
                    if owner is None or not owner.earlier_attempt_of(me):
                        raise JobDirBusy(owner.refusal(job_dir, me) if owner else
                                         f"{job_dir} is being run by another process, which is starting (its "
                                         f"{LOCK_FILE} holds no record yet): wait for it, or stop it")
                    if time.monotonic() < deadline:
                        os.close(fd)
                        time.sleep(1.0)  # the earlier attempt of this SLURM job is ending
                        continue
                    log.warning("[lock] %s: the earlier attempt of SLURM job %s (pid %d on %s) still holds it "
                                "after %.0f s: taking over", job_dir, owner.slurm_job_id, owner.pid, owner.host, wait_s)
                elif owner is not None:  # left by a run that did not end cleanly, or is elsewhere
                    if not owner.is_gone(me, flock_works=locked is True):
                        raise JobDirBusy(owner.refusal(job_dir, me))
                    log.info("[lock] %s: taking over the lock of pid %d on %s (since %s), which is gone",
                             job_dir, owner.pid, owner.host, owner.since)
                record = json.dumps(asdict(me)).encode()
                os.pwrite(fd, record, 0)
                os.ftruncate(fd, len(record))
                os.fsync(fd)  # visible to the other hosts of a network filesystem
                return cls(path, fd, me)
            except BaseException:
                os.close(fd)
                raise

    def release(self) -> None:
        """Remove the lock file (when the record in it is still ours) and drop the flock. Idempotent."""
        if self.fd < 0:
            return
        try:
            if Owner.read(self.fd) == self.owner and same_file(self.fd, self.path):
                self.path.unlink()
        except OSError as err:  # the job's record is complete: a lock file left behind is taken over next time
            log.warning("[lock] could not remove %s: %s", self.path, err)
        finally:
            os.close(self.fd)  # drops the flock
            self.fd = -1
