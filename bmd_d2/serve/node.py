"""The node: its folder, the SCP and the worker in one process (``bmd-serve run``), and its state (``status``).

Start: the folder (mode 0700) and ``node.db`` are opened, the model is loaded once, crash recovery runs
(:meth:`~.store.Store.recover`), then the SCP listens and the worker steps in the calling (main) thread until
``stop`` is set (SIGTERM/SIGINT in ``bmd-serve run``) or, with ``once``, until nothing is left to do. A measurement
in progress at a stop is not awaited beyond the current step: the next start measures it again.
"""
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, Optional

from bmd_d2.version import __version__

from .config import NodeConfig, describe
from .scp import StorageSCP, make_dirs, remove_stale_incoming
from .store import Store, uid_hash
from .worker import Worker, summary

logger = logging.getLogger(__name__)

LOG_NAME = "node.log"


def add_file_log(cfg: NodeConfig, handler_like: logging.Handler) -> logging.Handler:
    """Also log to ``<folder>/logs/node.log`` (mode 0600) through the filters of ``handler_like`` (PHI first)."""
    logs = os.path.join(cfg.folder, "logs")
    make_dirs(logs)
    path = os.path.join(logs, LOG_NAME)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for f in handler_like.filters:
        handler.addFilter(f)
    logging.getLogger().addHandler(handler)
    return handler


def open_store(cfg: NodeConfig) -> Store:
    make_dirs(cfg.folder)
    os.chmod(cfg.folder, 0o700)
    return Store(cfg.folder)


class Node:
    """SCP + worker over one folder.

    Args:
        cfg: the node config.
        predictor: passed to :class:`~.worker.Worker` (None: built from ``cfg.model``).
    """

    def __init__(self, cfg: NodeConfig, predictor: Optional[Callable] = None):
        self.cfg = cfg
        self.store = open_store(cfg)
        self.worker = Worker(cfg, self.store, predictor)
        self.scp = StorageSCP(cfg, self.store)
        self.stop_event = threading.Event()

    def start(self):
        """Crash recovery (after the model was loaded, so that the quiet time of a series that was receiving starts
        when the SCP listens again), then the SCP."""
        moved = self.store.recover()
        stale = remove_stale_incoming(os.path.join(self.cfg.folder, "incoming"))
        if any(moved.values()) or stale:
            logger.info("recovered: %d measuring → queued, %d sending → measured, %d receiving kept, "
                        "%d partial files removed", moved["measuring"], moved["sending"], moved["receiving"], stale)
        self.scp.start()

    def run(self, *, once: bool = False):
        """Serve until :attr:`stop_event` is set (or, with ``once``, until idle); the SCP is stopped at the end."""
        self.start()
        try:
            self.worker.run(self.stop_event, once=once)
        finally:
            self.close()

    def close(self):
        self.scp.stop()
        self.store.close()


def series_json(s) -> Dict[str, Any]:
    """One series of ``status``: hashes only, no UIDs or header values."""
    return {"series_uid_hash": uid_hash(s["series_uid"]), "study_uid_hash": uid_hash(s["study_uid"]),
            "receipt": s["receipt"], "state": s["state"], "version": s["version"], "instances": s["instances"],
            "attempts": s["attempts"], "reason": s["reason"],
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s["updated_at"])),
            "result_dir": s["result_dir"]}


def status(cfg: NodeConfig) -> Dict[str, Any]:
    """``bmd-serve status``: node info and one object per series version (none before the first start)."""
    info = {"version": __version__, **describe(cfg)}
    try:
        store = Store(cfg.folder, readonly=True)
    except (FileNotFoundError, OSError):
        return {"node": {**info, "started": False}, "counts": {}, "series": []}
    try:
        counts, rows = summary(store)
    finally:
        store.close()
    return {"node": {**info, "started": True}, "counts": counts, "series": [series_json(s) for s in rows]}
