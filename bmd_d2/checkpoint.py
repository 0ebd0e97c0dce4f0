"""Safe checkpoint loading, compact model export, and the weights ↔ config check.

- ``BMDCheckpointer``: Detectron2's ``DetectionCheckpointer`` that loads ``.pth`` files with
  ``torch.load(weights_only=True)`` (no arbitrary code runs while loading) and refuses pickle (``.pkl``) files.
  ``load_preloaded`` loads a file already read (for the config check below) without reading it again.
- ``export_model``: a training checkpoint → a small file for shipping: the model's state dict (fp16 by default) and
  the config it was trained with.
- ``check_weights_config``: refuses weights whose architecture config differs from the config given, naming the keys.
"""
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer

from .errors import BMDError

logger = logging.getLogger(__name__)

__all__ = ["BMDCheckpointer", "export_model", "check_weights_config", "load_checkpoint_file"]

# Config sections whose values must equal the training run's for the weights to mean what they meant in training.
_CHECKED_SECTIONS = ("MODEL", "INPUT.DICOM", "INPUT.FORMAT")
# Keys in those sections a user may change at test time.
_FREE_KEYS = {"MODEL.WEIGHTS", "MODEL.DEVICE"}


def load_checkpoint_file(path: str) -> Dict:
    """Load a checkpoint without executing code from it.

    Returns:
        A dict with a ``"model"`` state dict (a bare state dict is wrapped).

    Raises:
        BMDError: missing file, a pickle file, or a file that is not a weights-only torch checkpoint.
    """
    if not os.path.isfile(path):
        raise BMDError("model weights file not found", path=path)
    if path.endswith(".pkl"):
        raise BMDError("pickle (.pkl) checkpoints are refused: loading them can run arbitrary code; convert the "
                       "weights to a .pth state dict", path=path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage bytes make the weights-only unpickler fail with almost any type (IndexError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BMDError(f"not a loadable weights-only checkpoint ({first[:200]})", path=path) from e
    if not isinstance(obj, dict):
        raise BMDError(f"checkpoint holds a {type(obj).__name__}, not a state dict", path=path)
    if "model" not in obj:
        obj = {"model": obj}
    if not isinstance(obj["model"], dict) or not all(isinstance(v, torch.Tensor) for v in obj["model"].values()):
        raise BMDError("checkpoint 'model' entry is not a state dict of tensors", path=path)
    return obj


class BMDCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose file loading is weights-only (see :func:`load_checkpoint_file`)."""

    _preloaded: Optional[Tuple[str, Dict]] = None  # (path, checkpoint) given to load_preloaded, used once by load

    def load_preloaded(self, path: str, checkpoint: Dict) -> Dict:
        """``load(path)`` from the file's content already read by :func:`load_checkpoint_file` (e.g. for
        :func:`check_weights_config`), so the file is read once.

        Returns:
            as ``load``: the checkpoint data not loaded into the model.
        """
        self._preloaded = (path, checkpoint)
        try:
            return self.load(path)
        finally:
            self._preloaded = None

    def _load_file(self, filename: str) -> Dict:
        if self._preloaded is not None and self._preloaded[0] == filename:
            obj = self._preloaded[1]
        else:
            obj = load_checkpoint_file(filename)
        obj.pop("bmd_d2", None)  # export metadata, not checkpointable state
        return obj


def _flatten(node, prefix: str = "") -> Dict[str, object]:
    out = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, (list, tuple)) else v
    return out


def _checked(flat: Dict[str, object]) -> Dict[str, object]:
    return {k: v for k, v in flat.items()
            if any(k == s or k.startswith(s + ".") for s in _CHECKED_SECTIONS)
            and k not in _FREE_KEYS and "_TEST" not in k}


def _version_key_differences(stored: Dict[str, object], given: Dict[str, object]) -> List[str]:
    """Keys only one side has: another Detectron2 version (upstream main has keys v0.6 lacks, e.g.
    ``MODEL.ROI_BOX_HEAD.USE_FED_LOSS``) or another bmd_d2 version.

    A key the weights lack is fine while the config keeps this installation's default for it (the feature the
    weights were trained without stays off); a key the config lacks is unknown to this installation, which cannot
    apply it: logged, not refused.
    """
    from detectron2.config import get_cfg

    from .config import add_bmd_config

    defaults = _checked(_flatten(yaml.safe_load(add_bmd_config(get_cfg()).dump())))
    diffs = [f"{k}: weights (no such key, trained without it) vs config {given[k]!r}"
             for k in sorted(set(given) - set(stored)) if k not in defaults or given[k] != defaults[k]]
    unknown = sorted(set(stored) - set(given))
    if unknown:
        logger.warning("weights store config keys this Detectron2/bmd_d2 does not have (ignored): %s",
                       ", ".join(f"{k}={stored[k]!r}" for k in unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
    return diffs


def check_weights_config(cfg, path: Optional[str] = None, *, checkpoint: Optional[Dict] = None) -> List[str]:
    """Compare the architecture config stored in exported weights with ``cfg``.

    Args:
        cfg: the config the model will be built from.
        path: weights file; default ``cfg.MODEL.WEIGHTS``.
        checkpoint: the file's content when already loaded (:func:`load_checkpoint_file`); read from ``path`` if None.

    Returns:
        Keys that could not be compared (weights without stored config: a plain training checkpoint). Empty when
        the stored config was checked.

    Raises:
        BMDError: a key differs (one line naming up to 5 keys with both values).
    """
    path = path or cfg.MODEL.WEIGHTS
    if not path:
        return []
    meta = (checkpoint if checkpoint is not None else load_checkpoint_file(path)).get("bmd_d2")
    if not meta or "config" not in meta:
        return ["(no stored config: not checked)"]
    stored = _checked(_flatten(yaml.safe_load(meta["config"])))
    given = _checked(_flatten(yaml.safe_load(cfg.dump())))
    diffs = [f"{k}: weights {stored[k]!r} vs config {given[k]!r}"
             for k in sorted(set(stored) & set(given)) if stored[k] != given[k]]
    diffs += _version_key_differences(stored, given)
    if diffs:
        more = f" (+{len(diffs) - 5} more)" if len(diffs) > 5 else ""
        raise BMDError(f"weights were trained with a different config: {'; '.join(diffs[:5])}{more}", path=path)
    return []


def export_model(checkpoint: str, cfg, output: str, *, half: bool = True, info: Optional[dict] = None) -> str:
    """Write a compact, weights-only model file for shipping.

    Args:
        checkpoint: a Detectron2 training checkpoint (``model_final.pth``) or state dict.
        cfg: the config the model was trained with (stored, and checked again at load time).
        output: destination ``.pth``.
        half: store floating-point tensors as fp16 (half the size; loaded back into fp32 parameters).
        info: extra metadata (training command, iterations, data seeds) stored under ``bmd_d2``.

    Returns:
        ``output``.
    """
    state = load_checkpoint_file(checkpoint)["model"]
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    from .version import __version__

    obj = {"model": state, "bmd_d2": {"config": cfg.dump(), "version": __version__, **(info or {})}}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, output)
    logger.info("exported %d tensors to %s (%.1f MB)", len(state), output, os.path.getsize(output) / 1e6)
    return output
