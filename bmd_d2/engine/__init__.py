"""Training-loop pieces: the alternating 4-step schedule hook (``build_schedule_hooks(cfg)``)."""
from .schedule import AlternatingScheduleHook, build_schedule_hooks, frozen_parameter_names

__all__ = ["AlternatingScheduleHook", "build_schedule_hooks", "frozen_parameter_names"]
