"""The node's persistent queue: SQLite (``<folder>/node.db``, WAL), one transaction per state change.

Tables:

* ``series``: one row per receipt of a series (SeriesInstanceUID, receipt number 1, 2, ...): state (:data:`STATES`),
  its content ``version`` (a receipt whose content is new gets the next version; a ``duplicate`` keeps the version
  it repeats), instance count, content hash, delivery attempts, the reason of the last failure/filter, the calling
  AE and its address, timestamps, result folder.
* ``instances``: one row per received SOP instance of a receipt (keyed by SOPInstanceUID within it): its file, size
  and SHA-256. A row is inserted only after its file was fsynced and renamed into place, so a file half-written
  when the node was killed is never used.
* ``transitions``: every state change (series, receipt, old → new, time): the history ``status`` and tests read.

Crash recovery (:meth:`Store.recover`, at start): ``measuring`` → ``queued`` (measured again), ``sending`` →
``measured`` (sent again: the same SOP Instance UIDs, which a PACS overwrites or ignores), ``receiving`` series keep
their instances and their quiet time starts again.
"""
import hashlib
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from bmd_d2.utils.files import short_hash

logger = logging.getLogger(__name__)

STATES = ("receiving", "complete", "filtered", "duplicate", "queued", "measuring", "failed", "measured", "sending",
          "retry_wait", "delivered", "delivery_failed")
# states whose content is (or will be) measured and delivered: a re-send of the same content is a duplicate of them
LIVE = ("queued", "measuring", "measured", "sending", "retry_wait", "delivered")
# end states whose received images fall under storage.keep_received_hours
RETAINED = ("delivered", "duplicate", "filtered")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT NOT NULL, receipt INTEGER NOT NULL, version INTEGER NOT NULL, study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '',
    content_hash TEXT NOT NULL DEFAULT '', caller_ae TEXT NOT NULL DEFAULT '', caller_host TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL, updated_at REAL NOT NULL, last_instance_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL DEFAULT 0, result_dir TEXT NOT NULL DEFAULT '', purged INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (series_uid, receipt));
CREATE INDEX IF NOT EXISTS series_state ON series (state);
CREATE TABLE IF NOT EXISTS instances (
    series_uid TEXT NOT NULL, receipt INTEGER NOT NULL, sop_uid TEXT NOT NULL, sop_class TEXT NOT NULL,
    path TEXT NOT NULL, size INTEGER NOT NULL, digest TEXT NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (series_uid, receipt, sop_uid));
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, series_uid TEXT NOT NULL, receipt INTEGER NOT NULL, old TEXT NOT NULL,
    new TEXT NOT NULL, at REAL NOT NULL, reason TEXT NOT NULL DEFAULT '');
"""

_COLUMNS = ("series_uid", "receipt", "version", "study_uid", "state", "instances", "attempts", "reason",
            "content_hash", "caller_ae", "caller_host", "created_at", "updated_at", "last_instance_at",
            "next_attempt_at",
            "result_dir", "purged")


def uid_hash(uid: str) -> str:
    """The short identifier of a UID in logs, folder names and ``status``: SHA-1, 12 hex digits."""
    return short_hash(uid)


def content_hash(pairs: Sequence[Tuple[str, str]]) -> str:
    """Hash of a series version's content: its sorted (SOPInstanceUID, file digest) pairs."""
    h = hashlib.sha256()
    for sop, digest in sorted(pairs):
        h.update(f"{sop}\0{digest}\n".encode())
    return h.hexdigest()


class Series(dict):
    """One ``series`` row (a dict of :data:`_COLUMNS`) with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def key(self) -> Tuple[str, int]:
        return self["series_uid"], self["receipt"]

    @property
    def tag(self) -> str:
        """``<series hash> v<version>`` for log lines."""
        return f"series {uid_hash(self['series_uid'])} v{self['version']}"


class Store:
    """The queue of one node folder. Thread-safe: one connection guarded by a lock (SCP threads + the worker)."""

    def __init__(self, folder: str, *, readonly: bool = False):
        self.folder = folder
        self.path = os.path.join(folder, "node.db")
        self._lock = threading.RLock()
        if readonly:
            if not os.path.exists(self.path):
                raise FileNotFoundError(self.path)
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None, timeout=30)
            return
        old = os.umask(0o077)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        finally:
            os.umask(old)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.chmod(self.path + suffix, 0o600)

    def close(self):
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on an exception) under the store's lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- reading -------------------------------------------------------------------------------------------------------
    def _rows(self, where: str = "", args: Sequence = ()) -> List[Series]:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM series {where}"
        with self._lock:
            return [Series(zip(_COLUMNS, r)) for r in self._db.execute(sql, tuple(args)).fetchall()]

    def all_series(self) -> List[Series]:
        return self._rows("ORDER BY created_at, series_uid, receipt")

    def get(self, series_uid: str, receipt: int) -> Optional[Series]:
        rows = self._rows("WHERE series_uid = ? AND receipt = ?", (series_uid, receipt))
        return rows[0] if rows else None

    def in_state(self, *states: str, order: str = "updated_at") -> List[Series]:
        marks = ", ".join("?" * len(states))
        return self._rows(f"WHERE state IN ({marks}) ORDER BY {order}, series_uid, receipt", states)

    def receipts(self, series_uid: str) -> List[Series]:
        return self._rows("WHERE series_uid = ? ORDER BY receipt", (series_uid,))

    def instances(self, series_uid: str, receipt: int) -> List[Dict]:
        with self._lock:
            rows = self._db.execute("SELECT sop_uid, sop_class, path, size, digest FROM instances "
                                    "WHERE series_uid = ? AND receipt = ? ORDER BY sop_uid",
                                    (series_uid, receipt)).fetchall()
        return [dict(zip(("sop_uid", "sop_class", "path", "size", "digest"), r)) for r in rows]

    def stored_bytes(self) -> int:
        """Bytes of the received images still on disk (what ``storage.max_disk_gb`` limits)."""
        with self._lock:
            row = self._db.execute("SELECT COALESCE(SUM(i.size), 0) FROM instances i JOIN series s ON s.series_uid "
                                   "= i.series_uid AND s.receipt = i.receipt WHERE s.purged = 0").fetchone()
        return int(row[0])

    def transitions(self, series_uid: Optional[str] = None) -> List[Dict]:
        sql = "SELECT series_uid, receipt, old, new, at, reason FROM transitions"
        args: Tuple = ()
        if series_uid is not None:
            sql, args = sql + " WHERE series_uid = ?", (series_uid,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [dict(zip(("series_uid", "receipt", "old", "new", "at", "reason"), r)) for r in rows]

    # -- writing -------------------------------------------------------------------------------------------------------
    @staticmethod
    def _log(db, series_uid: str, receipt: int, old: str, new: str, at: float, reason: str = ""):
        db.execute("INSERT INTO transitions (series_uid, receipt, old, new, at, reason) VALUES (?, ?, ?, ?, ?, ?)",
                   (series_uid, receipt, old, new, at, reason))

    @staticmethod
    def next_version(db, series_uid: str, receipt: int = 0) -> int:
        """1 + the highest content version of ``series_uid``'s other receipts."""
        row = db.execute("SELECT COALESCE(MAX(version), 0) FROM series WHERE series_uid = ? AND receipt != ?",
                         (series_uid, receipt)).fetchone()
        return int(row[0]) + 1

    def receiving_receipt(self, db, series_uid: str, study_uid: str, caller_ae: str, caller_host: str) -> int:
        """Inside a :meth:`transaction`: the receipt of ``series_uid`` now receiving, created if none (its version,
        provisional until the series is complete: the next one)."""
        row = db.execute("SELECT receipt FROM series WHERE series_uid = ? AND state = 'receiving' "
                         "ORDER BY receipt DESC LIMIT 1", (series_uid,)).fetchone()
        if row:
            return int(row[0])
        top = db.execute("SELECT COALESCE(MAX(receipt), 0) FROM series WHERE series_uid = ?",
                         (series_uid,)).fetchone()
        receipt = int(top[0]) + 1
        now = time.time()
        db.execute("INSERT INTO series (series_uid, receipt, version, study_uid, state, caller_ae, caller_host, "
                   "created_at, updated_at, last_instance_at) VALUES (?, ?, ?, ?, 'receiving', ?, ?, ?, ?, ?)",
                   (series_uid, receipt, self.next_version(db, series_uid), study_uid, caller_ae, caller_host, now,
                    now, now))
        self._log(db, series_uid, receipt, "", "receiving", now)
        return receipt

    def add_instance(self, db, series_uid: str, receipt: int, sop_uid: str, sop_class: str, path: str, size: int,
                     digest: str, caller_ae: str = "", caller_host: str = ""):
        """Inside a :meth:`transaction`: record a received instance (its file is already in place)."""
        now = time.time()
        db.execute("INSERT OR REPLACE INTO instances (series_uid, receipt, sop_uid, sop_class, path, size, digest, "
                   "received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (series_uid, receipt, sop_uid, sop_class, path, size, digest, now))
        db.execute("UPDATE series SET instances = (SELECT COUNT(*) FROM instances WHERE series_uid = ? AND "
                   "receipt = ?), last_instance_at = ?, updated_at = ?, caller_ae = ?, caller_host = ? "
                   "WHERE series_uid = ? AND receipt = ?",
                   (series_uid, receipt, now, now, caller_ae, caller_host, series_uid, receipt))

    def set_state(self, s: Series, new: str, *, expect: Optional[str] = None, reason: Optional[str] = None,
                  **fields) -> bool:
        """Move ``s`` to ``new`` in one transaction (with the other ``fields``); with ``expect``, only from that state.

        Returns:
            False when ``expect`` was given and the row was no longer in that state (nothing changed).
        """
        assert new in STATES, new
        now = time.time()
        cols = {"state": new, "updated_at": now, **fields}
        if reason is not None:
            cols["reason"] = reason
        with self.transaction() as db:
            row = db.execute("SELECT state FROM series WHERE series_uid = ? AND receipt = ?", s.key).fetchone()
            if row is None or (expect is not None and row[0] != expect):
                return False
            sets = ", ".join(f"{k} = ?" for k in cols)
            db.execute(f"UPDATE series SET {sets} WHERE series_uid = ? AND receipt = ?", (*cols.values(), *s.key))
            self._log(db, s["series_uid"], s["receipt"], row[0], new, now, reason or "")
        s.update(cols)
        return True

    def mark_purged(self, s: Series):
        with self.transaction() as db:
            db.execute("UPDATE series SET purged = 1 WHERE series_uid = ? AND receipt = ?", s.key)
        s["purged"] = 1

    def recover(self) -> Dict[str, int]:
        """Crash recovery at start (module docstring). Returns how many series each rule moved."""
        now = time.time()
        moved = {}
        with self.transaction() as db:
            for old, new in (("measuring", "queued"), ("sending", "measured")):
                rows = db.execute("SELECT series_uid, receipt FROM series WHERE state = ?", (old,)).fetchall()
                for uid, receipt in rows:
                    db.execute("UPDATE series SET state = ?, updated_at = ? WHERE series_uid = ? AND receipt = ?",
                               (new, now, uid, receipt))
                    self._log(db, uid, receipt, old, new, now, "recovered after a restart")
                moved[old] = len(rows)
            cur = db.execute("UPDATE series SET last_instance_at = ? WHERE state = 'receiving'", (now,))
            moved["receiving"] = cur.rowcount
        return moved
