"""``bmd-serve``: a DICOM node that receives CT series from a PACS, measures them and sends SEG/SR/SC back.

Modules: :mod:`.config` (the node's YAML config, strictly validated), :mod:`.store` (the SQLite queue and its crash
recovery), :mod:`.scp` (the Storage SCP: C-STORE, C-ECHO, allow-list, TLS), :mod:`.worker` (completion, filters,
measurement, delivery with retry, retention), :mod:`.sender` (the C-STORE SCU), :mod:`.node` (all of it in one
process; ``status``). docs/pacs.md describes configuration, security, the series states and operations.
"""
from .config import NodeConfig, load_node_config
from .store import STATES, Store, uid_hash

__all__ = ["NodeConfig", "load_node_config", "Store", "STATES", "uid_hash"]
