"""Where a study lives, and how its workers stay safe: storage URLs, the study lock,
heartbeats and stale-trial retries.

Three backends (see the README's "Where the study lives"):
  - sqlite:///path/study.db  one machine (the default, under sweep.root);
  - journal:///path/study.log  many machines sharing a filesystem (NFS) and no database
    server: Optuna's append-only journal file with its NFS-safe lock file;
  - postgresql://user:password@host:5432/db  many machines and a server.

Optuna gives heartbeats and stale-trial retries only to its RDB storage. For the journal
file, `JournalFileStorage` adds them on the same mechanism (Optuna's BaseHeartbeat): each
running trial touches its own file under `<journal>.heartbeats/`, and a trial whose file
is older than the grace period is stale, so `fail_stale_trials` fails and re-enqueues it
exactly as on SQLite and PostgreSQL. Ages are measured against a file the checker
touches on the same filesystem, so clock skew between machines does not matter; a trial
that never beat gets its file when a checker first sees it, and ages from there. A finished
trial's file is removed.

Optuna has no public API for heartbeats on a storage other than its RDB one: this builds on
`optuna.storages._heartbeat.BaseHeartbeat` (pinned below Optuna 6, and tested). `Heartbeat`
is a daemon thread that survives a failed beat (a network hiccup), which Optuna's own
`HeartbeatThread` (non-daemon, ends on the first error) does not.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from .space import SweepError, SweepSpec

JOURNAL = "journal:///"
URL_FORMS = "sqlite:///path/study.db, journal:///path/study.log or postgresql://user:password@host:5432/dbname"


class JournalFileStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal file storage with heartbeats (see the module docstring)."""

    def __init__(self, path: str, heartbeat_interval: int, grace_period: int, callback: Callable | None) -> None:
        super().__init__(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
        self.beats = Path(f"{path}.heartbeats")
        self.interval, self.grace, self.callback = heartbeat_interval, grace_period, callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.beats.mkdir(exist_ok=True)
        (self.beats / str(trial_id)).touch()

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if state.is_finished():  # a finished trial beats no more (also one failed as stale): drop its file
            self.forget_heartbeat(trial_id)
        return changed

    def forget_heartbeat(self, trial_id: int) -> None:
        (self.beats / str(trial_id)).unlink(missing_ok=True)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        self.beats.mkdir(exist_ok=True)
        clock = self.beats / "now"
        clock.touch()
        now = clock.stat().st_mtime  # the filesystem's clock, the one that stamps the beats
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = self.beats / str(t._trial_id)
            if not beat.exists():  # never beat (killed right after asking): its age counts from now,
                beat.touch()  # on the filesystem's clock (its start is on the asking worker's)
                continue
            if now - beat.stat().st_mtime > self.grace:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.callback


def storage_url(spec: SweepSpec) -> tuple[str, Any]:
    """The storage URL (default: a SQLite file under the study's root) and its parsed form
    (a sqlalchemy URL, or the journal file's Path)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = spec.storage or f"sqlite:///{Path(spec.root) / spec.study_name / 'study.db'}"
    if url.startswith("journal:"):
        if not url.startswith(JOURNAL) or len(url) == len(JOURNAL):
            raise SweepError(
                f"malformed storage URL {url!r}: use journal:///path/study.log (three slashes, then the path)"
            )
        path = Path(url[len(JOURNAL) :])
        if not path.is_absolute() and os.environ.get("SLURM_JOB_ID"):
            raise SweepError(
                f"sweep.storage {url!r} is a relative path (three slashes, then the path), and under Slurm each "
                f"task resolves it against its own working directory: give the absolute one, journal:////{path}"
            )
        return url, path.resolve()
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise SweepError(f"malformed storage URL {url!r}: use {URL_FORMS}") from e
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise SweepError(f"unsupported storage {parsed.get_backend_name()!r}; use {URL_FORMS}")
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise SweepError(
            f"malformed storage URL {url!r}: an in-memory SQLite database dies with this process and no other "
            "worker can see it; give a file, sqlite:///runs/sweeps/NAME/study.db (three slashes, then the path)"
        )
    return url, parsed


def make_storage(spec: SweepSpec, create: bool = True) -> tuple[BaseStorage, str]:
    """Open the study storage; `create=False` refuses a SQLite or journal file that does not exist."""
    url, parsed = storage_url(spec)
    callback = RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retry)
    if isinstance(parsed, Path):
        return open_journal(parsed, spec, create, callback), url
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite and parsed.database:
        db = Path(parsed.database)
        if spec.storage and not db.parent.is_dir():  # as the journal: never create a directory somebody named
            raise SweepError(
                f"the SQLite file's directory {db.parent} does not exist; create it (mkdir -p), or fix sweep.storage"
            )
        if not create and not db.is_file():
            existing = sorted(p.parent.name for p in Path(spec.root).glob("*/study.db")) if not spec.storage else []
            raise SweepError(
                f"no study {spec.study_name!r}: {db} does not exist; existing under {spec.root}: {existing or 'none'}"
                if not spec.storage
                else f"no study database at {db}; run the sweep first, or check sweep.storage"
            )
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SweepError(
                f"cannot create the study directory {db.parent} ({e.strerror}); set sweep.root or sweep.storage "
                "to a writable place"
            ) from e
    # Two processes creating the tables of a new SQLite file at once collide ("table
    # studies already exists"): the first to open a study's file creates them alone.
    creating = study_lock(url, spec.study_name) if sqlite and create else contextlib.nullcontext()
    try:
        with creating:
            storage = RDBStorage(
                url,
                heartbeat_interval=spec.heartbeat_interval,
                grace_period=spec.grace_period,
                heartbeat_stale_trial_callback=callback,
                # SQLite: wait up to 60 s for another worker's write lock (the default 5 s gave
                # "database is locked" under load); a server: drop connections that died.
                engine_kwargs={"pool_pre_ping": True} if not sqlite else {"connect_args": {"timeout": 60}},
            )
    except Exception as e:  # OperationalError, missing driver, ...
        hint = (
            "Is the file's directory writable, and the file a SQLite database?"
            if sqlite
            else "Is the server running and reachable?"
        )
        raise SweepError(
            f"cannot open storage {parsed.render_as_string(hide_password=True)}: "
            f"{type(e).__name__}: {str(e).splitlines()[0]}. {hint}"
        ) from e
    return storage, url


def open_journal(path: Path, spec: SweepSpec, create: bool, callback: Callable) -> JournalFileStorage:
    if not path.parent.is_dir():
        raise SweepError(
            f"the journal file's directory {path.parent} does not exist; create it on the filesystem every worker "
            "shares (mkdir -p), or fix sweep.storage"
        )
    if not create and not path.is_file():
        raise SweepError(f"no study journal at {path}; run the sweep first, or check sweep.storage")
    try:
        return JournalFileStorage(str(path), spec.heartbeat_interval, spec.grace_period, callback)
    except OSError as e:
        raise SweepError(f"cannot open the journal file {path} ({e.strerror}); is its directory writable?") from e


@contextlib.contextmanager
def study_lock(url: str, name: str):
    """A lock all workers of a study share: a file lock next to a SQLite file, Optuna's
    NFS-safe lock file next to a journal, a PostgreSQL advisory lock for a server."""
    if url.startswith(JOURNAL):
        lock = JournalFileOpenLock(f"{url[len(JOURNAL) :]}.{name}.study")
        lock.acquire()
        try:
            yield
        finally:
            lock.release()
        return
    if url.startswith("sqlite"):
        from filelock import FileLock

        db = url.split("///", 1)[1]
        with FileLock(f"{db}.{name}.lock"):
            yield
        return
    import zlib

    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    key = zlib.crc32(f"resnet-lab:{name}".encode())
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
    engine.dispose()


class Heartbeat:
    """Record the trial's heartbeat every `interval` s from a daemon thread."""

    def __init__(self, storage: BaseHeartbeat, trial: optuna.Trial, interval: int) -> None:
        self.storage, self.trial_id, self.interval = storage, trial._trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)
            self._stop.wait(self.interval)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        forget = getattr(self.storage, "forget_heartbeat", None)
        if forget is not None:  # a beat the thread wrote just after the trial's tell
            forget(self.trial_id)
