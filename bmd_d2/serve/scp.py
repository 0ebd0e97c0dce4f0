"""The node's DICOM Storage SCP (pynetdicom): C-ECHO and C-STORE of CT images, an AE-title allow-list, optional TLS.

Received instances go to ``<folder>/incoming/<series hash>/r<receipt>/<instance hash>.dcm`` (files mode 0600, folders
0700): each is written to a temporary name in the series folder, fsynced, renamed into place, and only then recorded
in the queue (:mod:`.store`), so an instance whose writing was interrupted is never used. Above ``storage.max_disk_gb``
of received images a C-STORE is answered 0xA700 (out of resources) and nothing is written.

Associations from calling AE titles not in ``node.allowed_callers`` are rejected (A-ASSOCIATE-RJ, "calling AE title
not recognised") and logged with the reason; the called AE title must be the node's.
"""
import hashlib
import logging
import os
import ssl
import threading
from typing import Optional

from bmd_d2.errors import BMDError
from bmd_d2.reports.study import remove_stale_temp_files
from bmd_d2.utils.logs import register_phi, register_phi_from_dataset

from .config import NodeConfig
from .store import Store, uid_hash

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
ACCEPTED_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)
# uncompressed, deflated and the lossless compressions the DICOM loader decodes
TRANSFER_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
                     "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
                     "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5")
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
REFUSED_REASON = "calling AE title not recognised"


def make_dirs(path: str) -> None:
    """``os.makedirs`` with mode 0700 for every folder created (umask-independent)."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        make_dirs(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)


def write_private_file(folder: str, data: bytes, prefix: str = ".tmp-") -> str:
    """Write ``data`` to a new temporary file (mode 0600) in ``folder``, fsynced; returns its path."""
    name = f"{prefix}{os.getpid()}-{threading.get_ident()}-{os.urandom(6).hex()}.dcm"
    path = os.path.join(folder, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def server_ssl_context(cfg: NodeConfig) -> Optional[ssl.SSLContext]:
    """The SCP's TLS context (``node.tls``), None for plain TCP."""
    tls = cfg.node.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates:
        ctx.load_verify_locations(cafile=tls.ca_certificates)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else (
        ssl.CERT_OPTIONAL if tls.ca_certificates else ssl.CERT_NONE)
    return ctx


class StorageSCP:
    """The listening side of the node. :meth:`start` returns at once (pynetdicom serves in its own threads)."""

    def __init__(self, cfg: NodeConfig, store: Store):
        self.cfg = cfg
        self.store = store
        self.incoming = os.path.join(cfg.folder, "incoming")
        self.max_bytes = int(cfg.storage.max_disk_gb * 1e9)
        self._server = None

    def _allowed(self, ae_title: str) -> bool:
        return self.cfg.node.any_caller or ae_title.strip() in self.cfg.node.allowed_callers

    def build_ae(self):
        from pynetdicom import AE

        ae = AE(ae_title=self.cfg.node.ae_title)
        ae.require_called_aet = True
        if not self.cfg.node.any_caller:
            ae.require_calling_aet = list(self.cfg.node.allowed_callers)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        for uid in ACCEPTED_CLASSES:
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        ae.maximum_pdu_size = 0  # no limit on what we receive
        return ae

    def start(self):
        from pynetdicom import evt

        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_C_ECHO, self.on_echo),
                    (evt.EVT_REQUESTED, self.on_requested), (evt.EVT_ACCEPTED, self.on_accepted)]
        make_dirs(self.incoming)
        n = self.cfg.node
        if n.any_caller:
            logger.warning('node.allowed_callers is ["*"]: associations from any calling AE title are accepted')
        try:
            self._server = self.build_ae().start_server((n.host, n.port), block=False, evt_handlers=handlers,
                                                        ssl_context=server_ssl_context(self.cfg))
        except OSError as e:
            raise BMDError(f"node.port: cannot listen on {n.host}:{n.port}: {e.strerror or e}",
                           path=self.cfg.path) from None
        logger.info("listening as %s on %s:%d (%s)", n.ae_title, n.host, self.port, "TLS" if n.tls else "plain TCP")

    @property
    def port(self) -> int:
        if self._server is None:
            return self.cfg.node.port
        return self._server.server_address[1]

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- event handlers -----------------------------------------------------------------------------------------------
    @staticmethod
    def _caller(event):
        req = event.assoc.requestor
        return str(req.ae_title).strip(), str(req.address)

    def on_requested(self, event):
        """Log the refusal pynetdicom is about to send (A-ASSOCIATE-RJ), with the reason."""
        rq = event.assoc.requestor.primitive
        ae, called = str(rq.calling_ae_title).strip(), str(rq.called_ae_title).strip()
        host = str(event.assoc.requestor.address)
        if not self._allowed(ae):
            logger.warning("association from AE %r at %s refused: %s", ae, host, REFUSED_REASON)
        elif called != self.cfg.node.ae_title:
            logger.warning("association from AE %r at %s refused: called AE title %r not recognised (this node is "
                           "%r)", ae, host, called, self.cfg.node.ae_title)

    def on_accepted(self, event):
        ae, host = self._caller(event)
        logger.info("association from AE %r at %s accepted", ae, host)

    def on_echo(self, event):
        return SUCCESS

    def on_store(self, event):
        """Write one instance and record it; the returned status goes back to the caller."""
        ae, host = self._caller(event)
        try:
            ds = event.dataset
            series_uid, study_uid, sop_uid = (str(ds.get(k, "") or "") for k in
                                              ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID"))
            register_phi_from_dataset(ds)
            # the node's logs name studies and series by their hash only: a library warning that quotes a UID
            # (e.g. the loader's "series <uid>: ...") is redacted too
            register_phi([study_uid, series_uid])
        except Exception as e:  # an undecodable dataset: refuse it, keep serving
            logger.warning("C-STORE from %r refused: dataset cannot be decoded (%s)", ae, type(e).__name__)
            return CANNOT_UNDERSTAND
        if not (series_uid and study_uid and sop_uid):
            logger.warning("C-STORE from %r refused: no Study/Series/SOP Instance UID", ae)
            return CANNOT_UNDERSTAND
        if self.store.stored_bytes() >= self.max_bytes:
            logger.warning("C-STORE from %r refused (0xA700): received images exceed storage.max_disk_gb = %g",
                           ae, self.cfg.storage.max_disk_gb)
            return OUT_OF_RESOURCES
        data = bytes(event.encoded_dataset())
        # the content digest: the data set as received, without the file meta (which names the sending AE)
        digest = hashlib.sha256(event.encoded_dataset(include_meta=False)).hexdigest()
        series_dir = os.path.join(self.incoming, uid_hash(series_uid))
        make_dirs(series_dir)
        tmp = write_private_file(series_dir, data)
        try:
            with self.store.transaction() as db:
                receipt = self.store.receiving_receipt(db, series_uid, study_uid, ae, host)
                vdir = os.path.join(series_dir, f"r{receipt}")
                make_dirs(vdir)
                path = os.path.join(vdir, hashlib.sha1(sop_uid.encode()).hexdigest()[:24] + ".dcm")
                os.replace(tmp, path)
                _fsync_dir(vdir)
                self.store.add_instance(db, series_uid, receipt, sop_uid, str(event.request.AffectedSOPClassUID),
                                        path, len(data), digest, ae, host)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return SUCCESS


def remove_stale_incoming(incoming: str) -> int:
    """Delete the temporary files an interrupted C-STORE left (``.tmp-*`` in the series folders)."""
    if not os.path.isdir(incoming):
        return 0
    return sum(remove_stale_temp_files(e.path) for e in os.scandir(incoming) if e.is_dir())
