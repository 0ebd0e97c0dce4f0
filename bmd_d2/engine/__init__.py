"""Running the model over many inputs: the alternating 4-step training schedule hook (``build_schedule_hooks(cfg)``)
and the batch runner of many studies (:mod:`bmd_d2.engine.batch`, imported on use: it needs the reports)."""
from .schedule import AlternatingScheduleHook, build_schedule_hooks, frozen_parameter_names

__all__ = ["AlternatingScheduleHook", "build_schedule_hooks", "frozen_parameter_names"]
