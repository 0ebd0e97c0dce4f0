"""The node's YAML config (``bmd-serve --config node.yaml``): dataclasses and a strict loader.

Every key is checked: an unknown key, a value of the wrong type, a port out of range, a TLS file that cannot be read
or a regular expression that does not compile is a :class:`~bmd_d2.errors.BMDError` of one line naming the file and
the key (``node.yaml: node.port: 70000 is not a port (1..65535)``). Sections and keys (docs/pacs.md, "Configuration"):
``node`` (``ae_title``, ``host``, ``port``, ``folder``, ``allowed_callers``, ``tls``), ``series``, ``destination``,
``callers``, ``storage``, ``model``.

Relative paths of ``node.folder`` and the TLS files are relative to the config file's folder; ``model.config_file``
and ``model.weights`` are read as ``bmd-measure`` reads them (relative to the working folder).
"""
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from bmd_d2.errors import BMDError

SENDER = "sender"
OUTPUT_KINDS = ("seg", "sr", "sc")


@dataclass(frozen=True)
class TLSConfig:
    """The node's certificate files (PEM): its own certificate and key, optionally the CAs callers are signed by."""

    certificate: str
    private_key: str
    ca_certificates: str = ""
    require_client_certificate: bool = False


@dataclass(frozen=True)
class NodeSection:
    ae_title: str = "BMD_D2"
    host: str = "127.0.0.1"
    port: int = 11112
    folder: str = "bmd_node"
    allowed_callers: Tuple[str, ...] = ()
    tls: Optional[TLSConfig] = None

    @property
    def any_caller(self) -> bool:
        """True when ``allowed_callers`` is ``["*"]`` (every calling AE title is accepted)."""
        return "*" in self.allowed_callers


@dataclass(frozen=True)
class SeriesRules:
    quiet_seconds: float = 10.0
    modalities: Tuple[str, ...] = ("CT",)
    min_slices: int = 20
    max_slice_thickness_mm: float = 5.0
    include: Dict[str, str] = field(default_factory=dict)
    exclude: Dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RetryPolicy:
    first_delay_s: float = 5.0
    max_delay_s: float = 300.0
    max_attempts: int = 0  # 0 = keep retrying

    def delay(self, attempts: int) -> float:
        """Seconds to wait after failed attempt number ``attempts``: ``first_delay_s``, doubling, at most
        ``max_delay_s``."""
        return min(self.first_delay_s * (2.0 ** max(attempts - 1, 0)), self.max_delay_s)


@dataclass(frozen=True)
class Destination:
    ae_title: str = SENDER
    host: str = ""
    port: int = 0
    outputs: Tuple[str, ...] = OUTPUT_KINDS
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tls: bool = False  # send over TLS (the node's certificate as client certificate, its CAs to verify the peer)


@dataclass(frozen=True)
class Caller:
    host: str = ""
    port: int = 0


@dataclass(frozen=True)
class StorageSection:
    max_disk_gb: float = 50.0
    keep_received_hours: float = 24.0


@dataclass(frozen=True)
class ModelSection:
    config_file: str = "configs/bmd_default.yaml"
    weights: str = ""
    opts: Tuple[str, ...] = ()
    device: str = "cpu"


@dataclass(frozen=True)
class NodeConfig:
    """The whole node config; ``path`` is the file it was read from."""

    path: str
    node: NodeSection
    series: SeriesRules
    destination: Destination
    callers: Dict[str, Caller]
    storage: StorageSection
    model: ModelSection

    @property
    def folder(self) -> str:
        return self.node.folder


# ---------------------------------------------------------------------------------------------------------------------
# Validation helpers: each raises one BMDError line "<file>: <key>: <problem>"
# ---------------------------------------------------------------------------------------------------------------------
class _Checker:
    def __init__(self, path: str):
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))

    def fail(self, key: str, problem: str):
        raise BMDError(f"{key}: {problem}", path=self.path)

    def mapping(self, value, key: str, allowed: Optional[Tuple[str, ...]] = None) -> Dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"expected a mapping, got {type(value).__name__}")
        for k in value:
            if not isinstance(k, str):
                self.fail(key, f"key {k!r} is not a string")
            if allowed is not None and k not in allowed:
                self.fail(f"{key}.{k}" if key else k, f"unknown key (expected one of {', '.join(allowed)})")
        return value

    def string(self, d: Dict, name: str, key: str, default: str) -> str:
        value = d.get(name, default)
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(f"{key}.{name}", f"expected a string, got {type(value).__name__}")
        return value

    def boolean(self, d: Dict, name: str, key: str, default: bool) -> bool:
        value = d.get(name, default)
        if not isinstance(value, bool):
            self.fail(f"{key}.{name}", f"expected true or false, got {value!r}")
        return value

    def number(self, d: Dict, name: str, key: str, default: float, lo: float = 0.0, integer: bool = False):
        value = d.get(name, default)
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            kind = "an integer" if integer else "a number"
            self.fail(f"{key}.{name}", f"expected {kind}, got {value!r}")
        if value < lo:
            self.fail(f"{key}.{name}", f"{value!r} is below {lo:g}")
        return int(value) if integer else float(value)

    def port(self, d: Dict, name: str, key: str, default: int, allow_zero: bool = False) -> int:
        value = d.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{key}.{name}", f"expected an integer port, got {value!r}")
        if not (1 <= value <= 65535 or (allow_zero and value == 0)):
            self.fail(f"{key}.{name}", f"{value} is not a port (1..65535)")
        return value

    def ae_title(self, value, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"expected an AE title (1 to 16 characters), got {value!r}")
        if len(value) > 16 or "\\" in value or any(ord(c) < 32 for c in value):
            self.fail(key, f"{value!r} is not a valid AE title (at most 16 characters, no backslash)")
        return value.strip()

    def string_list(self, d: Dict, name: str, key: str, default) -> Tuple[str, ...]:
        value = d.get(name, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(f"{key}.{name}", f"expected a list of strings, got {value!r}")
        return tuple(value)

    def regexes(self, d: Dict, name: str, key: str) -> Dict[str, str]:
        from pydicom.datadict import keyword_dict

        rules = self.mapping(d.get(name), f"{key}.{name}")
        for kw, pattern in rules.items():
            if kw not in keyword_dict:
                self.fail(f"{key}.{name}.{kw}", "not a DICOM keyword")
            if not isinstance(pattern, str):
                self.fail(f"{key}.{name}.{kw}", f"expected a regular expression string, got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as e:
                self.fail(f"{key}.{name}.{kw}", f"bad regular expression: {e}")
        return dict(rules)

    def path_here(self, value: str) -> str:
        """``value`` resolved against the config file's folder (absolute paths unchanged)."""
        return value if os.path.isabs(value) else os.path.normpath(os.path.join(self.base, value))

    def readable_file(self, d: Dict, name: str, key: str, required: bool) -> str:
        value = self.string(d, name, key, "")
        if not value:
            if required:
                self.fail(f"{key}.{name}", "missing (a PEM file)")
            return ""
        path = self.path_here(value)
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            self.fail(f"{key}.{name}", f"cannot read {path}: {e.strerror or e}")
        return path


_TOP = ("node", "series", "destination", "callers", "storage", "model")
_NODE = ("ae_title", "host", "port", "folder", "allowed_callers", "tls")
_TLS = ("certificate", "private_key", "ca_certificates", "require_client_certificate")
_SERIES = ("quiet_seconds", "modalities", "min_slices", "max_slice_thickness_mm", "include", "exclude")
_DEST = ("ae_title", "host", "port", "outputs", "retry", "tls")
_RETRY = ("first_delay_s", "max_delay_s", "max_attempts")
_STORAGE = ("max_disk_gb", "keep_received_hours")
_MODEL = ("config_file", "weights", "opts", "device")


def _node(c: _Checker, d: Dict) -> NodeSection:
    d = c.mapping(d, "node", _NODE)
    callers = c.string_list(d, "allowed_callers", "node", ())
    if not callers:
        c.fail("node.allowed_callers", 'empty: list the calling AE titles allowed to connect (["*"] = any)')
    for i, ae in enumerate(callers):
        if ae != "*":
            c.ae_title(ae, f"node.allowed_callers[{i}]")
    tls = None
    if d.get("tls") is not None:
        t = c.mapping(d["tls"], "node.tls", _TLS)
        tls = TLSConfig(certificate=c.readable_file(t, "certificate", "node.tls", True),
                        private_key=c.readable_file(t, "private_key", "node.tls", True),
                        ca_certificates=c.readable_file(t, "ca_certificates", "node.tls", False),
                        require_client_certificate=c.boolean(t, "require_client_certificate", "node.tls", False))
        if tls.require_client_certificate and not tls.ca_certificates:
            c.fail("node.tls.require_client_certificate", "needs node.tls.ca_certificates to check the callers")
        _check_pem(c, tls)
    folder = c.string(d, "folder", "node", "")
    if not folder:
        c.fail("node.folder", "missing (the node's working folder)")
    return NodeSection(ae_title=c.ae_title(d.get("ae_title", "BMD_D2"), "node.ae_title"),
                       host=c.string(d, "host", "node", "127.0.0.1"), port=c.port(d, "port", "node", 11112),
                       folder=c.path_here(folder), allowed_callers=tuple(a.strip() for a in callers), tls=tls)


def _check_pem(c: _Checker, tls: TLSConfig) -> None:
    """The certificate, key and CA files must load into an SSL context (PEM, key matching the certificate)."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(tls.certificate, tls.private_key)
    except (ssl.SSLError, OSError, ValueError) as e:
        c.fail("node.tls.private_key", f"certificate/key do not load (PEM, matching pair expected): {e}")
    if tls.ca_certificates:
        try:
            ctx.load_verify_locations(cafile=tls.ca_certificates)
        except (ssl.SSLError, OSError, ValueError) as e:
            c.fail("node.tls.ca_certificates", f"does not load (PEM expected): {e}")


def _series(c: _Checker, d: Dict) -> SeriesRules:
    d = c.mapping(d, "series", _SERIES)
    return SeriesRules(quiet_seconds=c.number(d, "quiet_seconds", "series", 10.0),
                       modalities=c.string_list(d, "modalities", "series", ("CT",)),
                       min_slices=c.number(d, "min_slices", "series", 20, integer=True),
                       max_slice_thickness_mm=c.number(d, "max_slice_thickness_mm", "series", 5.0),
                       include=c.regexes(d, "include", "series"), exclude=c.regexes(d, "exclude", "series"))


def _destination(c: _Checker, d: Dict, node: NodeSection) -> Destination:
    d = c.mapping(d, "destination", _DEST)
    ae = c.ae_title(d.get("ae_title", SENDER), "destination.ae_title")
    host = c.string(d, "host", "destination", "")
    port = c.port(d, "port", "destination", 0, allow_zero=True)
    if ae != SENDER and (not host or not port):
        c.fail("destination.host" if not host else "destination.port",
               f'needed when destination.ae_title is not "{SENDER}"')
    outputs = c.string_list(d, "outputs", "destination", OUTPUT_KINDS)
    for i, kind in enumerate(outputs):
        if kind not in OUTPUT_KINDS:
            c.fail(f"destination.outputs[{i}]", f"{kind!r} is not one of {', '.join(OUTPUT_KINDS)}")
    r = c.mapping(d.get("retry"), "destination.retry", _RETRY)
    retry = RetryPolicy(first_delay_s=c.number(r, "first_delay_s", "destination.retry", 5.0),
                        max_delay_s=c.number(r, "max_delay_s", "destination.retry", 300.0),
                        max_attempts=c.number(r, "max_attempts", "destination.retry", 0, integer=True))
    use_tls = c.boolean(d, "tls", "destination", False)
    if use_tls and node.tls is None:
        c.fail("destination.tls", "needs node.tls (the certificate files)")
    return Destination(ae_title=ae, host=host, port=port, outputs=tuple(dict.fromkeys(outputs)), retry=retry,
                       tls=use_tls)


def _callers(c: _Checker, d: Dict) -> Dict[str, Caller]:
    out = {}
    for ae, entry in c.mapping(d, "callers").items():
        key = f"callers.{ae}"
        c.ae_title(ae, key)
        e = c.mapping(entry, key, ("host", "port"))
        out[ae.strip()] = Caller(host=c.string(e, "host", key, ""), port=c.port(e, "port", key, 0))
    return out


def _storage(c: _Checker, d: Dict) -> StorageSection:
    d = c.mapping(d, "storage", _STORAGE)
    return StorageSection(max_disk_gb=c.number(d, "max_disk_gb", "storage", 50.0),
                          keep_received_hours=c.number(d, "keep_received_hours", "storage", 24.0))


def _model(c: _Checker, d: Dict) -> ModelSection:
    d = c.mapping(d, "model", _MODEL)
    config_file = c.string(d, "config_file", "model", "configs/bmd_default.yaml")
    if not os.path.isfile(config_file):
        c.fail("model.config_file", f"{config_file} not found")
    weights = c.string(d, "weights", "model", "")
    if weights and not os.path.isfile(weights):
        c.fail("model.weights", f"{weights} not found")
    opts = d.get("opts", [])
    if not isinstance(opts, list) or len(opts) % 2:
        c.fail("model.opts", "expected a list of KEY VALUE pairs (even length)")
    return ModelSection(config_file=config_file, weights=weights, opts=tuple(str(o) for o in opts),
                        device=c.string(d, "device", "model", "cpu"))


def load_node_config(path: str) -> NodeConfig:
    """Read and validate a node config file.

    Raises:
        BMDError: one line naming the file and the key: a missing or unparsable file, an unknown key, a wrong type,
            a port out of range, an unreadable TLS file, a bad regular expression, a missing model config.
    """
    import yaml

    c = _Checker(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise BMDError(f"cannot read the node config: {e.strerror or e}", path=path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise BMDError(f"not valid YAML{where}: {getattr(e, 'problem', None) or e}", path=path) from None
    data = c.mapping(data, "", _TOP)
    if "node" not in data:
        c.fail("node", "missing section")
    node = _node(c, data["node"])
    return NodeConfig(path=os.path.abspath(path), node=node, series=_series(c, data.get("series")),
                      destination=_destination(c, data.get("destination"), node),
                      callers=_callers(c, data.get("callers")), storage=_storage(c, data.get("storage")),
                      model=_model(c, data.get("model")))


def describe(cfg: NodeConfig) -> Dict[str, Any]:
    """The config as JSON-ready values (no secrets: file paths only), for ``bmd-serve status`` / ``check``."""
    n = cfg.node
    return {"ae_title": n.ae_title, "host": n.host, "port": n.port, "folder": n.folder,
            "allowed_callers": list(n.allowed_callers), "tls": n.tls is not None,
            "destination": cfg.destination.ae_title, "outputs": list(cfg.destination.outputs)}


__all__ = ["NodeConfig", "NodeSection", "TLSConfig", "SeriesRules", "Destination", "RetryPolicy", "Caller",
           "StorageSection", "ModelSection", "load_node_config", "describe", "SENDER", "OUTPUT_KINDS"]
