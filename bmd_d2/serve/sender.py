"""Delivery of a measured series' DICOM objects (SEG, SR, SC): a pynetdicom C-STORE SCU, TLS when configured.

One association per delivery; success = every C-STORE answered 0x0000 or a warning status (0x0001, 0xBxxx). A
failed delivery raises :class:`DeliveryError` (one line: where and why) and the worker retries it with backoff. The
objects keep their SOP Instance UIDs between attempts, so a PACS that received some of them before overwrites or
ignores them.
"""
import logging
import ssl
from dataclasses import dataclass
from typing import Optional, Sequence

from .config import SENDER, NodeConfig

logger = logging.getLogger(__name__)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SENT_CLASSES = (SEG_STORAGE, COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE)
_TRANSFER = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


class DeliveryError(Exception):
    """A delivery that did not succeed (the destination is unreachable, refused, or answered a failure)."""


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def destination_for(cfg: NodeConfig, caller_ae: str, caller_host: str) -> Peer:
    """Where a series' outputs go: ``destination`` or, for ``"sender"``, the calling AE (``callers`` gives its port).

    Raises:
        DeliveryError: ``"sender"`` and the calling AE title has no entry in ``callers``.
    """
    d = cfg.destination
    if d.ae_title != SENDER:
        return Peer(d.ae_title, d.host, d.port)
    entry = cfg.callers.get(caller_ae)
    if entry is None:
        raise DeliveryError(f"destination is the sender, but the calling AE {caller_ae!r} has no port in callers")
    return Peer(caller_ae, entry.host or caller_host, entry.port)


def client_ssl_context(cfg: NodeConfig) -> ssl.SSLContext:
    """TLS context to send with (``destination.tls``): the node's certificate as client certificate; the peer is
    verified against ``node.tls.ca_certificates`` when given."""
    tls = cfg.node.tls
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    if tls.ca_certificates:
        ctx.load_verify_locations(cafile=tls.ca_certificates)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(tls.certificate, tls.private_key)
    return ctx


def _ok(status: int) -> bool:
    return status == 0x0000 or status == 0x0001 or (status & 0xF000) == 0xB000


def send_files(cfg: NodeConfig, peer: Peer, paths: Sequence[str], *, timeout: float = 30.0) -> int:
    """C-STORE every file in ``paths`` to ``peer`` over one association; returns how many were stored.

    Raises:
        DeliveryError: no association (refused, unreachable, TLS failure), an aborted association, or a failure
            status for any file.
    """
    import pydicom
    from pynetdicom import AE

    ae = AE(ae_title=cfg.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for uid in SENT_CLASSES:
        ae.add_requested_context(uid, list(_TRANSFER))
    tls_args: Optional[tuple] = (client_ssl_context(cfg), None) if cfg.destination.tls else None
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    except (OSError, ssl.SSLError) as e:
        raise DeliveryError(f"cannot connect to {peer}: {e}") from None
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise DeliveryError(f"association with {peer} {why}")
    stored = 0
    try:
        for path in paths:
            ds = pydicom.dcmread(path)
            status = assoc.send_c_store(ds)
            if not status or "Status" not in status:
                raise DeliveryError(f"{peer}: no C-STORE response (association aborted or timed out)")
            code = int(status.Status)
            if not _ok(code):
                raise DeliveryError(f"{peer}: C-STORE failed with status 0x{code:04X}")
            stored += 1
    except (ValueError, RuntimeError) as e:  # e.g. no accepted presentation context for the object's class
        raise DeliveryError(f"{peer}: {e}") from None
    finally:
        if assoc.is_established:
            assoc.release()
    return stored
