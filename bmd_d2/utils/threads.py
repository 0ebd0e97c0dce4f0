"""How many threads bmd_d2's own CPU work (slice decoding) may use.

The thread budget is the number of usable cores (``os.sched_getaffinity``), capped by ``OMP_NUM_THREADS`` when that is
set: the variable that already caps PyTorch's and NumPy's BLAS threads also caps bmd_d2's own (the threads that decode
compressed slices). A batch worker given one core (``OMP_NUM_THREADS=1``) therefore decodes on one thread.
"""
import os
from typing import Optional

__all__ = ["usable_cores", "cpu_threads"]


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask where the OS has one, else all cores."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_threads(limit: Optional[int] = None) -> int:
    """Threads for CPU-bound work: usable cores, capped by ``OMP_NUM_THREADS`` (when a positive integer) and by
    ``limit``; at least 1."""
    n = usable_cores()
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    if limit is not None:
        n = min(n, int(limit))
    return max(1, n)
