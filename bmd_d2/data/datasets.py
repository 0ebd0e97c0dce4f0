"""Sagittal datasets: build ``sagittal/`` + COCO ``annotations.json`` from CT studies, and register them with Detectron2.

Layout (see ``docs/ARCHITECTURE.md``)::

    <root>/<dataset>/studies/<study_id>/dicom/*       CT series (any file names)
    <root>/<dataset>/studies/<study_id>/labels.nii.gz vertebral-body labels (T11 = 1 … S1 = 8)
    <root>/<dataset>/bmd.csv                          study_id,level,bmd_mg_cm3,trabecular_hu[,calibrated_hu]
    <root>/<dataset>/sagittal/<study_id>.png|.npz     prepared 3-slice images (cache)
    <root>/<dataset>/annotations.json                 COCO (category ids 1 = vertebral_body, 2 = sacrum)

``<root>`` is ``$BMD_DATASETS`` (default ``./datasets``). Registration is lazy: nothing is read until
``DatasetCatalog.get(name)``; then ``annotations.json`` is (re)built if missing and read.

Cache: every prepared study stores a key = BLAKE2b of its DICOM file contents, label file, BMD rows and the sagittal
parameters; re-running :func:`prepare_sagittal_dataset` skips studies whose key is unchanged.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import BMDError
from .dicom import find_dicom_files, load_nifti, load_volume
from bmd_d2.levels import LABEL_TO_LEVEL, LEVELS, THING_CLASSES, level_class
from .sagittal import SagittalImage, make_sagittal, sample_volume_to_sagittal

logger = logging.getLogger(__name__)

__all__ = [
    "PHANTOM_SPLITS",
    "register_datasets_by_name",
    "make_sagittal_params",
    "series_content_hash",
    "read_bmd_csv",
    "cached_sagittal",
    "prepare_sagittal_dataset",
    "load_bmd_dataset",
    "register_bmd_dataset",
    "register_bmd_user_dataset",
    "register_all_bmd_datasets",
]

PHANTOM_SPLITS = ("bmd_phantoms_train", "bmd_phantoms_val", "bmd_phantoms_test")
COCO_CATEGORIES = [{"id": i + 1, "name": n} for i, n in enumerate(THING_CLASSES)]
_CACHE_VERSION = "sag-v5"  # bump when the sagittal method changes (part of every cache key)


def make_sagittal_params(spacing: float = 1.0, size: int = 512, num_slices: int = 3, window_width: float = 1000.0,
                         window_level: float = 350.0) -> dict:
    """The sagittal-image parameters (part of every cache key); the keys match :func:`make_sagittal`'s arguments."""
    return {"spacing": float(spacing), "size": int(size), "num_slices": int(num_slices),
            "window_width": float(window_width), "window_level": float(window_level)}


def params_from_cfg(cfg) -> dict:
    """Sagittal parameters from ``cfg.INPUT.DICOM``."""
    d = cfg.INPUT.DICOM
    return make_sagittal_params(d.SAGITTAL_SPACING, d.IMAGE_SIZE, d.NUM_SLICES, d.WINDOW_WIDTH, d.WINDOW_LEVEL)


def series_content_hash(source, extra: Iterable[str] = ()) -> str:
    """BLAKE2b (hex, 32 chars) of a series' file contents (in sorted relative-path order) and ``extra`` strings.

    Args:
        source: a DICOM folder, one file (DICOM or NIfTI), or a list of files.
        extra: strings mixed into the key (parameters, versions).
    """
    h = hashlib.blake2b(digest_size=16)
    files = find_dicom_files(source) if not (isinstance(source, (str, os.PathLike)) and os.path.isfile(source)) \
        else [str(source)]
    base = str(source) if isinstance(source, (str, os.PathLike)) and os.path.isdir(source) else ""
    for f in sorted(files):
        h.update(os.path.relpath(f, base).encode() if base else os.path.basename(f).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    for e in extra:
        h.update(str(e).encode())
    return h.hexdigest()


def read_bmd_csv(path) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Read ``study_id,level,bmd_mg_cm3,trabecular_hu[,calibrated_hu]`` → ``{study: {level: {"bmd": …,
    "trabecular_hu": …, "calibrated_hu": …}}}``.

    Missing values (and a missing ``calibrated_hu`` column) become NaN. Raises ``BMDError`` for a missing file or missing columns.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise BMDError("BMD CSV not found", path=path)
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"study_id", "level", "bmd_mg_cm3"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise BMDError(f"BMD CSV needs columns {sorted(need)}, has {reader.fieldnames}", path=path)

        def num(v):
            try:
                return float(v)
            except (TypeError, ValueError):
                return float("nan")

        for row in reader:
            level = (row["level"] or "").strip().upper()
            if level not in LEVELS:
                raise BMDError(f"unknown level '{row['level']}' (expected one of {', '.join(LEVELS)})", path=path)
            out.setdefault(row["study_id"].strip(), {})[level] = {
                "bmd": num(row.get("bmd_mg_cm3")), "trabecular_hu": num(row.get("trabecular_hu")),
                "calibrated_hu": num(row.get("calibrated_hu"))}
    return out


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _nan_to_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _annotations_from_labels(labels2d: np.ndarray, bmd_rows: Dict[str, Dict[str, float]], min_area_px: int) -> List[dict]:
    from pycocotools import mask as mask_util

    anns = []
    for lab in sorted(int(v) for v in np.unique(labels2d) if v > 0):
        level = LABEL_TO_LEVEL.get(lab)
        if level is None:
            continue
        m = labels2d == lab
        area = int(m.sum())
        if area < min_area_px:
            continue
        rle = _rle(m)
        x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
        row = bmd_rows.get(level, {})
        anns.append({"bbox": [x, y, w, h], "segmentation": rle, "area": area, "category_id": level_class(level) + 1,
                     "level": level, "bmd": _nan_to_none(row.get("bmd")),
                     "trabecular_hu": _nan_to_none(row.get("trabecular_hu")),
                     "calibrated_hu": _nan_to_none(row.get("calibrated_hu")), "iscrowd": 0})
    return anns


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    tmp = path.with_suffix(".tmp.png")
    if not cv2.imwrite(str(tmp), np.ascontiguousarray(image[..., ::-1])):  # PNG R,G,B = channels 0,1,2
        raise BMDError("cannot write PNG", path=str(path))
    os.replace(tmp, path)


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _study_sagittal(series_dir, label_file, params: dict, label_map: Optional[Dict[int, int]] = None,
                    series_uid: Optional[str] = None) -> Tuple[SagittalImage, Optional[np.ndarray], dict]:
    vol = load_volume(series_dir, series_uid=series_uid)
    sag = make_sagittal(vol, **params)
    labels = None
    if label_file:
        lab = load_nifti(label_file, dtype=np.int16)
        if label_map:
            mapped = np.zeros_like(lab.data)
            for src, dst in label_map.items():
                mapped[lab.data == int(src)] = int(dst)
            lab.data = mapped
        labels = sample_volume_to_sagittal(sag, lab, order=0, cval=0).astype(np.uint8)
    ident = {k: vol.meta.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}
    ident["volume_warnings"] = list(vol.warnings)
    return sag, labels, ident


def cached_sagittal(series_dir, cache_dir, params: dict, *, label_file=None, label_map=None, name=None,
                    key_extra: Sequence[str] = ()) -> Tuple[Path, Path, bool]:
    """Build (or reuse) the sagittal PNG + NPZ of one series in ``cache_dir``.

    The NPZ holds ``hu`` int16 (C, H, W) HU (rounded), ``transform`` float64 (4, 4), ``labels`` uint8 (C, H, W) (when a
    label file is given), ``key`` and ``info`` (JSON). It is rebuilt only when the content key changes.

    Returns:
        (png path, npz path, whether it was rebuilt).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    extra = [_CACHE_VERSION, json.dumps(params, sort_keys=True), json.dumps(label_map or {}, sort_keys=True),
             *key_extra]
    key = series_content_hash(series_dir, extra)
    if label_file:
        key = hashlib.blake2b((key + series_content_hash(label_file)).encode(), digest_size=16).hexdigest()
    stem = name or key
    png, npz = cache_dir / f"{stem}.png", cache_dir / f"{stem}.npz"
    if png.is_file() and npz.is_file():
        try:
            with np.load(npz) as z:
                if str(z["key"]) == key:
                    return png, npz, False
        except (OSError, ValueError, KeyError):
            pass
    sag, labels, ident = _study_sagittal(series_dir, label_file, params, label_map)
    info = dict(sag.info, **ident, spacing=sag.spacing)
    arrays = {"hu": np.clip(np.rint(sag.hu), -32768, 32767).astype(np.int16), "transform": sag.transform,
              "key": np.array(key), "info": np.array(json.dumps(info, default=float))}
    if labels is not None:
        arrays["labels"] = labels
    _write_png(png, sag.image)
    _save_npz(npz, **arrays)
    return png, npz, True


def _build_cache_job(job: dict):
    """Worker of ``prepare_sagittal_dataset(workers=N)``: build one cache entry; errors are re-raised later."""
    try:
        cached_sagittal(**job)
        return job["name"], True
    except BMDError:
        return job["name"], False  # the main loop meets the same error and handles it per skip_errors


def _phantom_studies(root: Path) -> List[dict]:
    studies_dir = root / "studies"
    if not studies_dir.is_dir():
        raise BMDError("no studies/ folder (generate phantoms or use the documented layout)", path=str(root))
    out = []
    for d in sorted(p for p in studies_dir.iterdir() if p.is_dir()):
        series = d / "dicom" if (d / "dicom").is_dir() else d
        label = d / "labels.nii.gz"
        out.append({"study_id": d.name, "series_dir": str(series), "label_file": str(label) if label.is_file() else None})
    return out


def prepare_sagittal_dataset(root, *, studies: Optional[List[dict]] = None, bmd_csv=None, out_dir=None,
                             params: Optional[dict] = None, label_map: Optional[Dict[int, int]] = None,
                             min_area_px: int = 30, skip_errors: bool = False, workers: int = 0) -> Path:
    """Build ``sagittal/<study>.png|.npz`` and the COCO ``annotations.json`` of a dataset.

    Args:
        root: dataset folder (``<root>/studies/...``, ``<root>/bmd.csv``).
        studies: explicit list of ``{"study_id", "series_dir", "label_file"}`` (user layouts); default: ``studies/``.
        bmd_csv: BMD table; default ``<root>/bmd.csv`` (optional: without it ``bmd`` is null).
        out_dir: where ``sagittal/`` and ``annotations.json`` go; default ``root``.
        params: :func:`make_sagittal_params`; default 1 mm, 512², 3 slices, W1000/L350.
        label_map: source label value → project label value (T11 = 1 … S1 = 8), e.g. for VerSe volumes.
        min_area_px: levels whose mid-plane cross-section is smaller are not annotated.
        skip_errors: log and skip studies that fail to load instead of raising.
        workers: build the sagittal caches in this many processes first (0: in this process, one by one).

    Returns:
        Path of ``annotations.json``.
    """
    root = Path(root)
    out_dir = Path(out_dir) if out_dir else root
    params = params or make_sagittal_params()
    studies = studies if studies is not None else _phantom_studies(root)
    csv_path = Path(bmd_csv) if bmd_csv else root / "bmd.csv"
    bmd = read_bmd_csv(csv_path) if csv_path.is_file() else {}
    sag_dir = out_dir / "sagittal"
    jobs = [dict(series_dir=st["series_dir"], cache_dir=sag_dir, params=params, label_file=st.get("label_file"),
                 label_map=label_map, name=st["study_id"],
                 key_extra=[json.dumps(bmd.get(st["study_id"], {}), sort_keys=True, default=str)]) for st in studies]
    prebuilt = set()
    if workers and workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        from tqdm import tqdm

        with mp.get_context("spawn").Pool(workers) as pool:
            for sid, ok in tqdm(pool.imap_unordered(_build_cache_job, jobs), total=len(jobs), desc="sagittal",
                                unit="study", disable=None):
                if ok:
                    prebuilt.add(sid)
    images, annotations, rebuilt, failed = [], [], 0, []
    for idx, st in enumerate(studies):
        sid = st["study_id"]
        rows = bmd.get(sid, {})
        try:
            png, npz, new = cached_sagittal(**jobs[idx])
            new = new or sid in prebuilt
        except BMDError as ex:
            if not skip_errors:
                raise
            logger.error("skipping study %s: %s", sid, ex)
            failed.append(sid)
            continue
        rebuilt += int(new)
        with np.load(npz) as z:
            labels = z["labels"] if "labels" in z.files else None
            info = json.loads(str(z["info"]))
            H, W = z["hu"].shape[1:]
        image_id = idx + 1
        images.append({"id": image_id, "file_name": os.path.relpath(png, out_dir), "height": int(H), "width": int(W),
                       "study_id": sid, "series_dir": str(st["series_dir"]), "label_file": st.get("label_file"),
                       "sagittal_file": os.path.relpath(npz, out_dir), "spacing": info.get("spacing"),
                       "scale": info.get("scale"), "cut": info.get("cut")})
        if labels is not None:
            for a in _annotations_from_labels(labels[labels.shape[0] // 2], rows, min_area_px):
                a.update(id=len(annotations) + 1, image_id=image_id)
                annotations.append(a)
    coco = {"info": {"description": f"bmd_d2 sagittal dataset {root.name}", "version": _CACHE_VERSION,
                     "params": params},
            "images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
    out = out_dir / "annotations.json"
    tmp = out.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(coco, f)
    os.replace(tmp, out)
    logger.info("prepared %s: %d studies (%d rebuilt, %d failed), %d annotations", out, len(images), rebuilt,
                len(failed), len(annotations))
    return out


def load_bmd_dataset(json_file, image_root=None) -> List[dict]:
    """Read a prepared ``annotations.json`` into Detectron2 dataset dicts (contiguous category ids 0/1).

    Returns:
        list of dicts ``{"file_name", "height", "width", "image_id", "study_id", "series_dir", "label_file",
        "sagittal_file", "annotations": [{"bbox", "bbox_mode", "segmentation", "category_id", "level", "bmd",
        "trabecular_hu", "calibrated_hu", "core_hu", "iscrowd"}]}`` (``calibrated_hu`` NaN in datasets prepared
        without it; ``core_hu``, the measurement's 3-D core HU written by ``tools/annotate_core_hu.py``, NaN where
        not annotated).
    """
    from detectron2.structures import BoxMode

    json_file = Path(json_file)
    image_root = Path(image_root) if image_root else json_file.parent
    if not json_file.is_file():
        raise BMDError("annotations file not found", path=str(json_file))
    with open(json_file, encoding="utf-8") as f:
        coco = json.load(f)
    by_image: Dict[int, List[dict]] = {}
    for a in coco.get("annotations", []):
        by_image.setdefault(a["image_id"], []).append(a)
    dicts = []
    for im in coco.get("images", []):
        anns = []
        for a in by_image.get(im["id"], []):
            anns.append({"bbox": a["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "segmentation": a["segmentation"],
                         "category_id": int(a["category_id"]) - 1, "level": a.get("level"),
                         "bmd": float("nan") if a.get("bmd") is None else float(a["bmd"]),
                         "trabecular_hu": float("nan") if a.get("trabecular_hu") is None else float(a["trabecular_hu"]),
                         "calibrated_hu": float("nan") if a.get("calibrated_hu") is None else float(a["calibrated_hu"]),
                         "core_hu": float("nan") if a.get("core_hu") is None else float(a["core_hu"]),
                         "iscrowd": int(a.get("iscrowd", 0))})
        dicts.append({"file_name": str(image_root / im["file_name"]), "height": im["height"], "width": im["width"],
                      "image_id": im["id"], "study_id": im.get("study_id"), "series_dir": im.get("series_dir"),
                      "label_file": im.get("label_file"),
                      "sagittal_file": str(image_root / im["sagittal_file"]) if im.get("sagittal_file") else None,
                      "annotations": anns})
    return dicts


def _set_metadata(name: str, json_file: Path, root: Path) -> None:
    from detectron2.data import MetadataCatalog

    MetadataCatalog.get(name).set(
        thing_classes=list(THING_CLASSES), levels=list(LEVELS), evaluator_type="bmd", json_file=str(json_file),
        image_root=str(root), thing_dataset_id_to_contiguous_id={c["id"]: c["id"] - 1 for c in COCO_CATEGORIES})


def register_bmd_dataset(name: str, root, *, params: Optional[dict] = None) -> None:
    """Register a dataset of the standard layout under ``name`` (lazy: nothing is read now).

    On ``DatasetCatalog.get(name)``, ``<root>/annotations.json`` is read; when it does not exist yet it is first
    built from ``<root>/studies``. An existing file is not refreshed (checking every series' content hash means
    reading the whole dataset): after changing the studies, run ``prepare_sagittal_dataset(root)`` again
    (``bmd-make-phantoms`` does it after writing studies).
    """
    from detectron2.data import DatasetCatalog

    root = Path(root)
    json_file = root / "annotations.json"

    def load():
        if not json_file.is_file() and (root / "studies").is_dir():
            prepare_sagittal_dataset(root, params=params)
        return load_bmd_dataset(json_file, root)

    DatasetCatalog.register(name, load)
    _set_metadata(name, json_file, root)


def register_bmd_user_dataset(name: str, *, dicom_root, label_root, bmd_csv, out_dir, label_map=None,
                              params: Optional[dict] = None) -> None:
    """Register user data: ``<dicom_root>/<study_id>/`` DICOM (or ``<study_id>.nii.gz`` CT), labels
    ``<label_root>/<study_id>.nii.gz`` (or ``<label_root>/<study_id>/labels.nii.gz``), a BMD CSV; outputs go to
    ``out_dir``. ``label_map`` maps source label values to T11 = 1 … S1 = 8 (e.g. VerSe 19…26 → 2…8 … ). Lazy.
    """
    from detectron2.data import DatasetCatalog

    out_dir = Path(out_dir)
    json_file = out_dir / "annotations.json"

    def studies():
        droot, lroot = Path(dicom_root), Path(label_root)
        if not droot.is_dir():
            raise BMDError("DICOM root not found", path=str(droot))
        out = []
        for d in sorted(droot.iterdir()):
            sid = d.name[:-7] if d.name.endswith(".nii.gz") else d.name
            if not d.is_dir() and not d.name.endswith((".nii", ".nii.gz")):
                continue
            cands = [lroot / f"{sid}.nii.gz", lroot / f"{sid}.nii", lroot / sid / "labels.nii.gz"]
            label = next((str(c) for c in cands if c.is_file()), None)
            out.append({"study_id": sid, "series_dir": str(d), "label_file": label})
        return out

    def load():
        prepare_sagittal_dataset(out_dir, studies=studies(), bmd_csv=bmd_csv, out_dir=out_dir, params=params,
                                 label_map=label_map)
        return load_bmd_dataset(json_file, out_dir)

    DatasetCatalog.register(name, load)
    _set_metadata(name, json_file, out_dir)


def register_all_bmd_datasets(root: Optional[str] = None) -> None:
    """Register ``bmd_phantoms_{train,val,test}`` under ``root`` (default ``$BMD_DATASETS`` or ``datasets``).

    Called at ``import bmd_d2``; it scans nothing. Already-registered names are left alone.
    """
    from detectron2.data import DatasetCatalog

    root = Path(root if root is not None else os.environ.get("BMD_DATASETS", "datasets"))
    for name in PHANTOM_SPLITS:
        if name in DatasetCatalog.list():
            continue
        register_bmd_dataset(name, root / name)


def register_datasets_by_name(names: Iterable[str], root: Optional[str] = None) -> List[str]:
    """Register each of ``names`` that is not registered yet but is a dataset folder of the standard layout
    (``annotations.json`` or ``studies/``) under ``root`` (default ``$BMD_DATASETS`` or ``datasets``).

    Lets a config train on any dataset folder by name, e.g. ``DATASETS.TRAIN ("bmd_phantoms_train",
    "bmd_phantoms_train_v1")``; names that are neither registered nor such a folder are left for Detectron2 to
    report. Returns the names registered here.
    """
    from detectron2.data import DatasetCatalog

    root_p = Path(root if root is not None else os.environ.get("BMD_DATASETS", "datasets"))
    done = []
    for name in names:
        if name in DatasetCatalog.list():
            continue
        folder = root_p / name
        if (folder / "annotations.json").is_file() or (folder / "studies").is_dir():
            register_bmd_dataset(name, folder)
            done.append(name)
    return done
