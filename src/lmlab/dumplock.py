"""One lmlab run per dump folder, and runs that end with their launcher (issue 21).

**The lock.** `<dump>/.lmlab.lock` is locked with flock(2). The kernel releases an flock when the last
descriptor of the open file that holds it is closed, which a process's exit does however it ends (SIGKILL
included), so a lock file left by a dead run is never in the way and is never deleted. The file holds who
took the lock (a JSON line: PID, host, time, a random token), followed by one line per trainer sharing it;
a refused run reads it for its one-line error and writes nothing.

Who holds it, on one node (`bash train.sh`):

1. the launcher takes it exclusively (a second run is refused here, before anything in the dump folder is
   written, `<dump>/logs` included), writes its record, and turns the lock into a shared one;
2. torchrun inherits the launcher's descriptor, so holds the same lock for as long as it lives;
3. every trainer takes a shared lock of its own and checks that the record is still its launcher's
   (`LMLAB_DUMP_LOCK` carries the launcher's token), appending its PID.

A new run needs the exclusive lock, so it is refused while any process of the running one lives: the
launcher, torchrun, or a trainer left behind by a kill (still saving, say). Without the token check a
trainer whose launcher and torchrun were killed before it took its share could join a newer run's lock;
with it, it is refused. A run started without the launcher (`python -m lmlab.train`, the tests), or with
`NNODE` > 1, is locked by the trainer of global rank 0 alone, exclusively: a launcher cannot tell whether
the other nodes write the same (shared) folder, and on a shared filesystem they would refuse each other.
Across nodes the lock works where the filesystem implements flock (NFS and most parallel filesystems); a
filesystem without locks gets a warning and no lock.

**Ending with the launcher.** On Linux, torchrun and each trainer ask the kernel for SIGTERM when their parent
ends (prctl PR_SET_PDEATHSIG): a SIGKILLed launcher takes torchrun with it, which stops its trainers (they
save, as on any SIGTERM); a SIGKILLed torchrun signals the trainers directly. The signal comes when the
parent *thread* ends: both parents start their children from their main thread, which lives as long as
they do. When a SIGKILLed parent's threads end one by one, the child passes from one to the next and may
get the signal once per thread: torchrun takes them as one (lmlab.launch.launcher_death_once), and a
trainer only sets its stop flag again. Elsewhere (macOS) there is no such call and the children outlive a
SIGKILLed launcher.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

from lmlab.config import RECORD_NAME
from lmlab.errors import UserError

LOCK_FILE = ".lmlab.lock"
TOKEN_ENV = "LMLAB_DUMP_LOCK"  # set by the launcher for its trainers: the owner's token, or NO_LOCK
NO_LOCK = "none"  # the filesystem has no locks: the trainers take none either
AGENT_PID_ENV = "LMLAB_AGENT_PID"  # torchrun's PID, set by lmlab.launch.torchrun for its trainers
UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}
HOST = socket.gethostname()


def holds_a_run(folder: Path) -> bool:
    """Whether `folder` is an lmlab run's dump folder (its lock file or its recorded config)."""
    return (folder / LOCK_FILE).exists() or (folder / RECORD_NAME).is_file()


class DumpInUse(UserError):
    """Another run holds the dump folder."""


class DumpLock:
    """This process's hold on a dump folder (`fd` None: none taken). Closing it lets go of this process's share;
    the lock itself ends with the last process holding it."""

    def __init__(self, fd: int | None = None, token: str = NO_LOCK, close_in_forks: bool = False) -> None:
        self.fd, self.token = fd, token
        if close_in_forks and fd is not None:
            _CLOSE_IN_FORKS.append(self)

    def close(self) -> None:
        if self in _CLOSE_IN_FORKS:
            _CLOSE_IN_FORKS.remove(self)
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self) -> "DumpLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A trainer's forked children (data-loader workers) would otherwise keep its lock after it died.
_CLOSE_IN_FORKS: list[DumpLock] = []


def _close_in_child() -> None:
    for lock in list(_CLOSE_IN_FORKS):
        lock.close()


os.register_at_fork(after_in_child=_close_in_child)


def take(dump: Path, shared: bool = False, close_in_forks: bool = False) -> DumpLock:
    """Own `dump`: lock it exclusively and record this process as the owner, or raise DumpInUse without
    writing anything. `shared`: then turn the lock into a shared one, for the trainers to join."""
    fd = _open(dump)
    try:
        if not _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
            raise DumpInUse(_in_use_message(dump, fd))
        token = uuid.uuid4().hex
        record = {"pid": os.getpid(), "host": HOST, "since": datetime.now().astimezone().isoformat(" ", "seconds"),
                  "token": token}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        # flock converts a lock by dropping it first: a run that got in between owns the folder now
        if shared and not (_flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB) and _owner_token(fd) == token):
            raise DumpInUse(_in_use_message(dump, fd))
    except _Unsupported as exc:
        os.close(fd)
        print(f"warning: cannot lock {dump} ({exc}); nothing stops a second lmlab run from using it at the "
              "same time", file=sys.stderr, flush=True)
        return DumpLock()
    except BaseException:
        os.close(fd)
        raise
    return DumpLock(fd, token, close_in_forks)


def join(dump: Path, token: str) -> DumpLock:
    """A trainer started by the launcher: share its launcher's lock (the record must hold `token`), or raise
    DumpInUse. The trainer's forked children do not keep the share."""
    fd = _open(dump, append=True)
    try:
        if not (_flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB) and _owner_token(fd) == token):
            raise DumpInUse(_in_use_message(dump, fd))
        os.write(fd, (json.dumps({"pid": os.getpid(), "host": HOST, "rank": os.environ.get("RANK")}) + "\n").encode())
    except _Unsupported:
        os.close(fd)
        return DumpLock()
    except BaseException:
        os.close(fd)
        raise
    return DumpLock(fd, token, close_in_forks=True)


def for_launcher(dump: Path) -> DumpLock:
    """The launcher's lock (shared after the check), or no lock with NNODE > 1 (see the module's docstring)."""
    if os.environ.get("NNODE", "1") != "1":
        return DumpLock(token="")
    return _one_line_errors(dump, lambda: take(dump, shared=True))


def for_trainer(dump: Path) -> DumpLock:
    """The trainer's lock: a share of its launcher's, or the whole lock on global rank 0 without a launcher."""
    token = os.environ.get(TOKEN_ENV)
    if token == NO_LOCK:
        return DumpLock()
    if token:
        return _one_line_errors(dump, lambda: join(dump, token))
    if int(os.environ.get("RANK", "0")) != 0:
        return DumpLock()
    return _one_line_errors(dump, lambda: take(dump, close_in_forks=True))


def trainer_env(lock: DumpLock) -> dict[str, str]:
    """What the launcher tells its trainers about the lock (nothing with NNODE > 1: rank 0 takes it)."""
    return {TOKEN_ENV: lock.token} if lock.token else {}


def _one_line_errors(dump: Path, acquire) -> DumpLock:
    try:
        return acquire()
    except OSError as exc:  # the folder cannot be created or written
        raise UserError(f"cannot lock {dump}: {exc.strerror or exc}") from None


class _Unsupported(Exception):
    pass


def _open(dump: Path, append: bool = False) -> int:
    dump.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else 0)
    return os.open(dump / LOCK_FILE, flags, 0o666)


def _flock(fd: int, operation: int) -> bool:
    """True if locked, False if another open file holds a conflicting lock."""
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in UNSUPPORTED:
            raise _Unsupported(exc.strerror) from None
        raise
    return True


def _records(fd: int) -> list[dict]:
    records = []
    for line in os.pread(fd, 1 << 16, 0).decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _owner_token(fd: int) -> str | None:
    records = _records(fd)
    return records[0].get("token") if records else None


def _in_use_message(dump: Path, fd: int) -> str:
    """Who holds `dump`: the first of its recorded processes still alive on this host (the launcher, else a
    trainer it left), or the owner's record. The owner may not have written it yet: wait for it a little."""
    for _ in range(20):
        records = _records(fd)
        if records and "token" in records[0]:
            break
        time.sleep(0.05)
    owner = records[0] if records else {}
    holder = next((r for r in records if r.get("host") == HOST and _alive(r.get("pid"))), owner)
    return (f"{dump} is in use by another lmlab run (PID {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {owner.get('since', '?')}); wait for it or stop it")


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- ending with the parent ----------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()  # resolved here, so that a child right after fork only makes the call


def die_with_parent(parent: int, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Linux: have the kernel send `sig` to this process when its parent (`parent`, the PID it had when it
    started this process) ends. If it ended before this call (the race between fork and prctl), end now:
    nothing has started yet. Returns False where there is no such call (not Linux)."""
    if _prctl is None or _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:
        os._exit(128 + int(sig))
    return True


def trainer_dies_with_torchrun() -> None:
    """In a trainer started by lmlab.launch's torchrun (its PID in AGENT_PID_ENV): SIGTERM when torchrun ends."""
    agent = os.environ.get(AGENT_PID_ENV)
    if agent:
        die_with_parent(int(agent))
