"""The speed benchmark behind ``tools/benchmark.py``: machine description, end-to-end study time, inference and
training throughput, peak memory per section, and the printed tables.

Sections and the JSON report are described in ``tools/benchmark.py``. The ``io`` section compares series loaders with
:mod:`~bmd_d2.evaluation.io_speed` and is passed in by the tool (:func:`run`'s ``io_benchmark``).
:func:`describe_machine`, :func:`build_cfg`, :func:`phantom_options` and :func:`write_json` are shared with
:mod:`bmd_d2.evaluation.benchmark_accuracy`.
"""
import contextlib
import json
import logging
import os
import platform
import resource
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable, Dict, List, Optional

import numpy as np

logger = logging.getLogger(__name__)

TARGET_P50_S, TARGET_P95_S = 1.0, 1.5  # issue 21: per study on 2 CPU cores, shipped config
TARGET_ANCHORS_S = 0.3  # issue 18: what the 3-D level anchors add per study (max), 2 CPU cores
# the 3-D level-anchor steps measure_detections calls (functions of bmd_d2.measure.vertebrae), timed per study; a
# 3-D sacrum step joins this list when the measurement calls one
ANCHOR_STEPS = ("find_level_anchors",)
SECTIONS = ("io", "e2e", "infer", "train")


# --------------------------------------------------------------------------------------------------- machine, config
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> Optional[float]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def describe_machine(device: str = "cpu") -> Dict[str, Any]:
    """CPU model, cores (logical and usable by this process), RAM, library versions and the compute device."""
    import detectron2
    import pydicom
    import torch

    from bmd_d2.utils.threads import usable_cores

    usable = usable_cores()
    d = OrderedDict(
        cpu=_cpu_model(), logical_cores=os.cpu_count(), usable_cores=usable, torch_threads=torch.get_num_threads(),
        ram_gb=round(_ram_gb(), 1) if _ram_gb() else None, load_average_1min=round(os.getloadavg()[0], 2),
        os=platform.platform(), python=platform.python_version(), numpy=np.__version__, torch=torch.__version__,
        detectron2=detectron2.__version__, pydicom=pydicom.__version__, device=device,
    )
    if device.startswith("cuda"):
        d["gpu"] = torch.cuda.get_device_name(torch.device(device))
        d["cuda"] = torch.version.cuda
    return d


def build_cfg(config_file: str, weights: Optional[str], device: Optional[str], opts: List[str],
              calibration: Optional[str] = None):
    """``get_bmd_cfg`` with ``--weights``, ``--device`` and ``--calibration`` applied (``BMDError`` on bad input)."""
    from bmd_d2.config import get_bmd_cfg
    from bmd_d2.errors import BMDError

    extra = list(opts or [])
    if weights:
        extra += ["MODEL.WEIGHTS", weights]
    if device:
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise BMDError(f"--device {device}: CUDA is not available on this machine")
        extra += ["MODEL.DEVICE", device]
    if calibration:
        extra += ["MEASURE.CALIBRATION_FILE", calibration]
    return get_bmd_cfg(config_file, extra)


def phantom_options(kind: str, **overrides):
    """``full``: clinical 512² studies, every scanner/patient variation random; ``tiny``: 96² test studies."""
    from bmd_d2.phantoms import PhantomOptions

    base = PhantomOptions.tiny(preview=False) if kind == "tiny" else PhantomOptions(preview=False)
    for k, v in overrides.items():
        setattr(base, k, v)
    return base


def _write_studies(jobs):
    """Child process: render and write phantom studies; returns their truth records (not the arrays)."""
    from bmd_d2.phantoms import generate_study, write_dicom_series, write_study

    out = []
    for seed, options, study_id, folder, full in jobs:
        st = generate_study(seed, options, study_id)
        if full:
            write_study(st, folder, preview=False)
        else:
            write_dicom_series(st, os.path.join(folder, "dicom"))
        out.append({"study_id": study_id, "seed": int(seed), "truth": st.truth, "shape_kji": list(st.hu.shape),
                    "slice_thickness": st.slice_thickness, "noise_sd": st.params.get("noise_sd"),
                    "kvp": st.params.get("kvp"), "transfer_syntax": st.style.transfer_syntax})
    return out


def write_phantoms(jobs: List[tuple], inline: bool = False) -> List[Dict]:
    """Render ``(seed, options, study_id, folder, with_labels)`` jobs in one child process (so the renderer's memory is
    not counted here), or in this process with ``inline`` (quicker to start: tests)."""
    if inline:
        return _write_studies(jobs)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
        return ex.submit(_write_studies, jobs).result()


# ------------------------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak RSS per section: ``VmHWM`` reset through ``/proc/self/clear_refs`` where allowed, else ``ru_maxrss``."""

    def __init__(self):
        self.resettable = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _hwm_mb() -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux

    def start(self):
        if self.resettable:
            self._reset()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        except Exception:  # pragma: no cover - no CUDA runtime
            pass

    def stop(self, device: str) -> Dict[str, Any]:
        d = {"peak_rss_mb": round(self._hwm_mb(), 1), "scope": "section" if self.resettable else "process lifetime",
             "children_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, 1)}
        if device.startswith("cuda"):
            import torch

            d["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        return d


def _sync(device: str):
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _stats(times: List[float]) -> Dict[str, Any]:
    t = np.asarray(times, dtype=np.float64)
    if t.size == 0:
        return {"n": 0, "p50_s": None, "p95_s": None, "mean_s": None, "min_s": None, "max_s": None}
    return {"n": int(t.size), "p50_s": float(np.percentile(t, 50)), "p95_s": float(np.percentile(t, 95)),
            "mean_s": float(t.mean()), "min_s": float(t.min()), "max_s": float(t.max())}


# ---------------------------------------------------------------------------------------------------------- sections
def _timed(fn: Callable, bucket: List[float], device: str) -> Callable:
    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        _sync(device)
        bucket.append(time.perf_counter() - t)
        return out

    return wrapper


@contextlib.contextmanager
def _timed_anchor_steps(bucket: List[float]):
    """While active, each call of a level-anchor step (:data:`ANCHOR_STEPS`, functions that ``measure_detections``
    looks up in :mod:`bmd_d2.measure.vertebrae`) appends its wall time (s) to ``bucket``."""
    from bmd_d2.measure import vertebrae as mod

    saved = {n: getattr(mod, n) for n in ANCHOR_STEPS}
    try:
        for n, fn in saved.items():
            setattr(mod, n, _timed(fn, bucket, "cpu"))
        yield bucket
    finally:
        for n, fn in saved.items():
            setattr(mod, n, fn)


def bench_e2e(cfg, study_dirs: List[str], device: str) -> Dict[str, Any]:
    """Time ``BMDStudyPredictor(cfg)(dicom_folder)`` per study; returns stats and the results (for inference)."""
    from bmd_d2.measure import BMDStudyPredictor

    pred = BMDStudyPredictor(cfg)
    parts = {"load": [], "sagittal": [], "model": []}
    pred(study_dirs[0])  # warm-up (allocator, threads, lazy imports)
    pred.load = _timed(pred.load, parts["load"], device)
    pred.sagittal = _timed(pred.sagittal, parts["sagittal"], device)
    pred.detect = _timed(pred.detect, parts["model"], device)
    totals, results, anchors = [], [], []
    calls: List[float] = []
    with _timed_anchor_steps(calls):
        for d in study_dirs:
            n0 = len(calls)
            t = time.perf_counter()
            res = pred(d)
            _sync(device)
            totals.append(time.perf_counter() - t)
            anchors.append(float(sum(calls[n0:])))  # 0 when the study had no spine (no anchor searched)
            results.append(res)
            logger.info("%s: %.3f s (load %.3f, sagittal %.3f, model %.3f, anchors %.3f), %s, %d vertebrae",
                        os.path.basename(os.path.dirname(d)), totals[-1], parts["load"][-1], parts["sagittal"][-1],
                        parts["model"][-1], anchors[-1], "×".join(str(n) for n in res.volume.data.shape)
                        if res.volume is not None else "?", len(res.vertebrae))
    measure = [tot - a - b - c for tot, a, b, c in zip(totals, parts["load"], parts["sagittal"], parts["model"])]
    out = _stats(totals)
    out["split_p50_s"] = {k: float(np.median(v)) for k, v in parts.items()}
    out["split_p50_s"]["measure"] = float(np.median(measure))
    out["per_study_s"] = totals
    out["per_study_split_s"] = [dict(load=a, sagittal=b, model=c, measure=m) for a, b, c, m in
                                zip(parts["load"], parts["sagittal"], parts["model"], measure)]
    out["vertebrae_per_study"] = [len(r.vertebrae) for r in results]
    # the 3-D level anchors (part of "measure"): issue 18's figure
    out["anchors_p50_s"], out["anchors_max_s"] = float(np.median(anchors)), float(np.max(anchors))
    out["per_study_anchors_s"] = anchors
    out["anchors_steps"] = list(ANCHOR_STEPS)
    out["target_anchors_s"] = TARGET_ANCHORS_S
    out["meets_target_anchors"] = bool(out["anchors_max_s"] <= TARGET_ANCHORS_S)
    out["target_p50_s"], out["target_p95_s"] = TARGET_P50_S, TARGET_P95_S
    out["meets_target_p50"] = bool(out["p50_s"] <= TARGET_P50_S)
    out["meets_target_p95"] = bool(out["p95_s"] <= TARGET_P95_S)
    return {"stats": out, "results": results, "predictor": pred}


def bench_infer(predictor, sagittals: List[Any], iters: int, batch: int, device: str) -> Dict[str, Any]:
    """Model forward images/s on the given sagittal images (test-time resize included in the input, not timed)."""
    import torch

    model = predictor.model
    model.eval()
    inputs = [predictor.tta.model_input(predictor.model_image(sag)) for sag in sagittals]
    batches = [[inputs[(i * batch + k) % len(inputs)] for k in range(batch)] for i in range(iters + 1)]
    with torch.no_grad():
        model(batches[0])  # warm-up
        _sync(device)
        t = time.perf_counter()
        for b in batches[1:]:
            model(b)
        _sync(device)
        dt = time.perf_counter() - t
    return {"iterations": iters, "batch": batch, "images": iters * batch, "seconds": dt,
            "images_per_s": iters * batch / dt, "input_hw": list(inputs[0]["image"].shape[1:])}


def bench_train(cfg, root: str, iters: int, device: str, warmup: int = 2) -> Dict[str, Any]:
    """``SimpleTrainer.run_step`` throughput on a prepared phantom dataset under ``root``."""
    import torch
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer, SimpleTrainer
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from bmd_d2.data import BMDDatasetMapper
    from bmd_d2.data.datasets import load_bmd_dataset, params_from_cfg, prepare_sagittal_dataset

    ann = prepare_sagittal_dataset(root, params=params_from_cfg(cfg))
    dicts = load_bmd_dataset(ann)
    loader = build_detection_train_loader(dataset=dicts, mapper=BMDDatasetMapper(cfg, is_train=True),
                                          total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
                                          num_workers=cfg.DATALOADER.NUM_WORKERS)
    torch.manual_seed(0)
    model = build_model(cfg)  # DefaultTrainer.build_model without printing the model
    model.train()
    trainer = SimpleTrainer(model, loader, DefaultTrainer.build_optimizer(cfg, model))
    with EventStorage(0) as storage:
        for i in range(warmup + iters):
            if i == warmup:
                _sync(device)
                t = time.perf_counter()
            trainer.iter = storage.iter = i
            trainer.run_step()
        _sync(device)
        dt = time.perf_counter() - t
        losses = {k: float(v.median(iters)) for k, v in storage.histories().items() if k.startswith("loss")}
    ims = iters * cfg.SOLVER.IMS_PER_BATCH
    return {"iterations": iters, "warmup_iterations": warmup, "ims_per_batch": int(cfg.SOLVER.IMS_PER_BATCH),
            "dataset_images": len(dicts), "num_workers": int(cfg.DATALOADER.NUM_WORKERS), "seconds": dt,
            "images_per_s": ims / dt, "s_per_iter": dt / iters, "input_min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN),
            "losses_median": losses}


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def _by_transfer_syntax(studies: List[Dict], e2e: Dict[str, Any]) -> List[list]:
    """Rows of the per-transfer-syntax table: where compressed series spend their time (decoding is the floor)."""
    split, totals = e2e.get("per_study_split_s") or [], e2e.get("per_study_s") or []
    groups: Dict[str, List[tuple]] = OrderedDict()
    for st, sp, tot in zip(studies, split, totals):
        if "transfer_syntax" in st:
            groups.setdefault(st["transfer_syntax"], []).append((st["shape_kji"][0], sp["load"], tot))
    rows = []
    for ts, g in sorted(groups.items()):
        k, load, tot = (np.array(v, float) for v in zip(*g))
        rows.append([ts, len(g), round(float(k.mean())), float(load.mean()), 1e3 * float((load / k).mean()),
                     float(tot.mean()), float(tot.max())])
    return rows


def format_report(rep: Dict[str, Any]) -> str:
    """The benchmark's tables (what ``tools/benchmark.py`` prints), one string without the final newline."""
    from tabulate import tabulate

    m = rep["machine"]
    lines: List[str] = []
    p = lines.append
    p(f"bmd_d2 speed benchmark — {rep['config_file']} | weights: {rep['weights']}")
    p(f"machine: {m['cpu']} | {m['usable_cores']} usable / {m['logical_cores']} logical cores | "
      f"torch threads {m['torch_threads']} | RAM {m['ram_gb']} GB | load avg {m['load_average_1min']}")
    p(f"         torch {m['torch']} | detectron2 {m['detectron2']} | pydicom {m['pydicom']} | device {m['device']}"
      + (f" ({m['gpu']})" if m.get("gpu") else ""))
    if "io" in rep:
        io = rep["io"]
        p(f"\nSeries load: {io['slices']} × {io['size']}² ({io['megabytes']} MB, {io['transfer_syntax']}), "
          f"best of {io['repeat']}, warm cache")
        p(tabulate([["raw read of the bytes", io["raw_read_s"], ""],
                    ["pydicom loop (.pixel_array only)", io["pydicom_pixel_array_loop_s"], 1.0],
                    ["pydicom loop + sort + HU float32", io["pydicom_loop_same_output_s"],
                     io["pydicom_pixel_array_loop_s"] / io["pydicom_loop_same_output_s"]],
                    ["bmd_d2 load_series (HU float32)", io["bmd_d2_load_series_s"], io["speedup_vs_plain_loop"]],
                    [f"bmd_d2 load_series(dtype='auto') (HU {io.get('auto_dtype', '?')}, used by the measurement)",
                     io.get("bmd_d2_load_series_auto_s"), io.get("speedup_auto_vs_plain_loop")]],
                   headers=["loader", "s", "× plain loop"], tablefmt="pipe", floatfmt=".3f"))
        p(f"identical HU: {io['identical_hu']}")
    if "e2e" in rep:
        e = rep["e2e"]
        sp = e["split_p50_s"]
        p(f"\nEnd to end per study (load → BMD per level), {e['n']} {rep['phantom']} studies, "
          f"{rep['machine']['device']}:")
        p(tabulate([[e["p50_s"], e["p95_s"], e["mean_s"], e["max_s"], sp["load"], sp["sagittal"], sp["model"],
                     sp["measure"], f"p50 ≤ {e['target_p50_s']:g} s {'met' if e['meets_target_p50'] else 'MISSED'}, "
                     f"p95 ≤ {e['target_p95_s']:g} s {'met' if e['meets_target_p95'] else 'MISSED'}"]],
                   headers=["p50 s", "p95 s", "mean s", "max s", "load", "sagittal", "model", "measure", "target"],
                   tablefmt="pipe", floatfmt=".3f"))
        if e.get("anchors_max_s") is not None:
            p(f"Level anchors ({', '.join(e['anchors_steps'])}; part of measure): p50 {e['anchors_p50_s']:.3f} s, "
              f"max {e['anchors_max_s']:.3f} s per study; "
              f"target max ≤ {e['target_anchors_s']:g} s {'met' if e['meets_target_anchors'] else 'MISSED'}")
        by_ts = _by_transfer_syntax(rep.get("studies") or [], e)
        if by_ts:
            p("\nBy transfer syntax (per study; load = reading + decoding the series):")
            p(tabulate(by_ts, headers=["transfer syntax", "studies", "slices (mean)", "load s (mean)",
                                       "load ms/slice", "total s (mean)", "total s (max)"],
                       tablefmt="pipe", floatfmt=".3f"))
    rows = []
    if "infer" in rep:
        i = rep["infer"]
        rows.append(["inference (model forward)", f"{i['images_per_s']:.2f}", f"batch {i['batch']}, "
                     f"{i['input_hw'][0]}×{i['input_hw'][1]} px, {i['images']} images"])
    if "train" in rep:
        t = rep["train"]
        rows.append(["training (SimpleTrainer.run_step)", f"{t['images_per_s']:.2f}",
                     f"{t['ims_per_batch']} images/iter, {t['iterations']} iters, {t['s_per_iter']:.2f} s/iter"])
    if rows:
        p("\nThroughput:")
        p(tabulate(rows, headers=["", "images/s", "setting"], tablefmt="pipe"))
    mem = rep.get("memory", {})
    if mem:
        p("\nPeak memory (RSS of this process; CUDA peak allocation on GPU):")
        p(tabulate([[k, v["peak_rss_mb"], v["children_peak_rss_mb"], _f(v.get("cuda_peak_allocated_mb"), "{:.1f}"),
                     v["scope"]] for k, v in mem.items()],
                   headers=["section", "peak RSS MB", "largest child MB", "CUDA MB", "scope"], tablefmt="pipe",
                   floatfmt=".1f"))
    if rep.get("random_init"):
        p("\nNOTE: random-init weights — timings are valid, detections (and vertebrae counts) are not meaningful.")
    return "\n".join(lines)


def run(args, io_benchmark: Optional[Callable[[int, int, int], Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Run the selected sections; returns the report dict (``tools/benchmark.py`` writes it to ``args.output``).

    Args:
        args: the options of ``tools/benchmark.py`` (``argparse.Namespace``: config_file, weights, device, opts,
            skip, studies, studies_dir, phantom, render, seed, io_slices, io_size, repeat, infer_iters, infer_batch,
            train_iters, train_studies, train_warmup).
        io_benchmark: ``io_benchmark(slices, size, repeat) -> dict``, the ``io`` section (``tools/benchmark.py``
            passes :func:`bmd_d2.evaluation.io_speed.bench_io`); required unless ``io`` is skipped.

    Raises:
        BMDError: an unknown section in ``args.skip``, a bad config, weights file or device, an empty --studies-dir.
    """
    import torch

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    bad = skip - set(SECTIONS)
    if bad:
        from bmd_d2.errors import BMDError

        raise BMDError(f"--skip: unknown section(s) {sorted(bad)}; choose from {','.join(SECTIONS)}")
    cfg = build_cfg(args.config_file, args.weights, args.device, args.opts)
    device = cfg.MODEL.DEVICE
    t0 = time.perf_counter()
    rep: Dict[str, Any] = OrderedDict(
        benchmark="speed", config_file=args.config_file, weights=cfg.MODEL.WEIGHTS or "(random init)",
        random_init=not cfg.MODEL.WEIGHTS, machine=describe_machine(device), phantom=args.phantom,
        image_size=int(cfg.INPUT.DICOM.IMAGE_SIZE), min_size_test=int(cfg.INPUT.MIN_SIZE_TEST),
        target_p50_s=TARGET_P50_S, target_p95_s=TARGET_P95_S)
    mem = PeakMemory()
    rep["memory"] = OrderedDict()
    torch.manual_seed(0)
    if "io" not in skip:
        logger.info("I/O: %d slices of %d² ...", args.io_slices, args.io_size)
        mem.start()
        if io_benchmark is None:
            raise ValueError("the io section needs io_benchmark (tools/benchmark.py passes it); or skip io")
        rep["io"] = io_benchmark(args.io_slices, args.io_size, args.repeat)
        rep["memory"]["io"] = mem.stop(device)
    with tempfile.TemporaryDirectory(prefix="bmd_bench_") as tmp:
        from bmd_d2.phantoms import study_seed, write_bmd_csv

        # All phantoms are rendered first, in one child process (not timed, its memory not counted).
        e2e_jobs = [(study_seed(args.seed, i), phantom_options(args.phantom), f"bench_{i:03d}",
                     os.path.join(tmp, "e2e", f"bench_{i:03d}"), False) for i in range(max(1, args.studies))]
        root = os.path.join(tmp, "train")
        train_jobs = [(study_seed(args.seed + 1, i), phantom_options(args.phantom), f"train_{i:03d}",
                       os.path.join(root, "studies", f"train_{i:03d}"), True)
                      for i in range(max(1, args.train_studies))]
        need_e2e = "e2e" not in skip or "infer" not in skip  # inference uses the e2e studies' sagittal images
        e2e_dirs = [os.path.join(j[3], "dicom") for j in e2e_jobs]
        if args.studies_dir:
            import glob

            e2e_dirs = sorted(glob.glob(os.path.join(args.studies_dir, "*", "dicom")))[:max(1, args.studies)]
            if not e2e_dirs:
                from bmd_d2.errors import BMDError

                raise BMDError(f"--studies-dir: no */dicom folder under {args.studies_dir}")
            e2e_jobs = []
        jobs = (e2e_jobs if need_e2e else []) + (train_jobs if "train" not in skip else [])
        if jobs:
            logger.info("rendering %d %s phantom studies (not timed) ...", len(jobs), args.phantom)
        info = write_phantoms(jobs, inline=args.render == "inline") if jobs else []
        e2e = None
        if need_e2e:
            rep["studies"] = ([{k: v for k, v in st.items() if k != "truth"} for st in info[:len(e2e_jobs)]]
                              if e2e_jobs else [{"dicom": d} for d in e2e_dirs])
            mem.start()
            e2e = bench_e2e(cfg, e2e_dirs, device)
            if "e2e" not in skip:
                rep["e2e"] = e2e["stats"]
                rep["memory"]["e2e"] = mem.stop(device)
        if "infer" not in skip and e2e is not None:
            mem.start()
            rep["infer"] = bench_infer(e2e["predictor"], [r.sagittal for r in e2e["results"]], args.infer_iters,
                                       args.infer_batch, device)
            rep["memory"]["infer"] = mem.stop(device)
        e2e = None
        if "train" not in skip:
            train_info = info[-len(train_jobs):]
            write_bmd_csv(os.path.join(root, "bmd.csv"), [dict(study_id=st["study_id"], level=t["level"],
                                                               bmd_mg_cm3=t["bmd_mg_cm3"],
                                                               trabecular_hu=t["trabecular_hu"])
                                                          for st in train_info for t in st["truth"]])
            train_cfg = cfg.clone()
            train_cfg.defrost()
            train_cfg.INPUT.DICOM.CACHE_DIR = os.path.join(tmp, "cache")
            train_cfg.OUTPUT_DIR = os.path.join(tmp, "train_out")
            train_cfg.freeze()
            mem.start()
            rep["train"] = bench_train(train_cfg, root, args.train_iters, device, warmup=args.train_warmup)
            rep["memory"]["train"] = mem.stop(device)
    rep["elapsed_s"] = time.perf_counter() - t0
    return rep


def write_json(rep: Dict[str, Any], path: str):
    """Write the report as JSON (NaN → null), atomically."""
    from bmd_d2.utils.files import atomic_write_text, json_ready

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(json_ready(rep), indent=2) + "\n")
