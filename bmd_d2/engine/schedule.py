"""Training schedules: joint end-to-end (no hook), the method's 4-step alternating schedule, or the BMD branch alone.

Alternating (``SOLVER.ALTERNATING.MODE: "alternating"``, ``STEP_ITERS: [n1, n2, n3, n4]``), with a shared backbone:

==== ======================== =================================== ===========================
step trained                  frozen (requires_grad=False)        losses detached (logged)
==== ======================== =================================== ===========================
1    backbone + RPN           ROI heads                           ROI-head losses
2    backbone + ROI heads     RPN                                 ``loss_rpn_*``
3    RPN                      backbone, ROI heads                 ROI-head losses
4    ROI heads                backbone, RPN                       ``loss_rpn_*``
==== ======================== =================================== ===========================

The optimizer is built once over all parameters. A frozen parameter keeps ``grad is None`` (the hook clears it when a
step starts and autograd never writes it), and PyTorch optimizers skip parameters without a gradient, so it gets no
update, no weight decay and no momentum. Losses of the frozen part are detached in a forward hook on the model, so
they cannot train the shared backbone through the features either. A frozen backbone is also put in eval mode so BN
statistics (if BN is used) stay fixed.

BMD branch alone (``SOLVER.ALTERNATING.MODE: "bmd_head"``, :class:`BMDHeadOnlyHook`): every parameter but
``roi_heads.bmd_head``'s is frozen and every loss but ``loss_bmd`` detached, so detections, masks and everything the
measurement takes from them stay exactly those of the starting weights (e.g. a BMD head retrained for a new target,
``MODEL.ROI_BMD_HEAD.TARGET``, on top of a shipped detector).
"""
import logging
from typing import Dict, Iterable, List, Optional, Sequence, Set

import torch
from torch import nn

from detectron2.engine import HookBase

__all__ = ["AlternatingScheduleHook", "BMDHeadOnlyHook", "build_schedule_hooks", "frozen_parameter_names", "STEP_FROZEN", "STEP_DETACHED"]

logger = logging.getLogger(__name__)

# Model parts: GeneralizedRCNN attributes.
_PARTS = {"backbone": "backbone", "rpn": "proposal_generator", "heads": "roi_heads"}
STEP_FROZEN: Dict[int, Set[str]] = {1: {"heads"}, 2: {"rpn"}, 3: {"backbone", "heads"}, 4: {"backbone", "rpn"}}
STEP_DETACHED: Dict[int, str] = {1: "heads", 2: "rpn", 3: "heads", 4: "rpn"}


def _is_rpn_loss(name: str) -> bool:
    return name.startswith("loss_rpn")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


class AlternatingScheduleHook(HookBase):
    """Detectron2 hook driving the 4-step alternating schedule (see module docstring).

    Args:
        step_iters: iterations of steps 1..4; iterations past their sum stay in step 4.
    """

    def __init__(self, *, step_iters: Sequence[int]):
        super().__init__()
        if len(step_iters) != 4 or any(int(n) < 0 for n in step_iters):
            raise ValueError(f"SOLVER.ALTERNATING.STEP_ITERS must be 4 non-negative ints, got {list(step_iters)}")
        self.step_iters = [int(n) for n in step_iters]
        self.current_step: Optional[int] = None
        self._handle = None
        self._model: Optional[nn.Module] = None

    def step_at(self, it: int) -> int:
        """Schedule step (1..4) of iteration ``it``."""
        end = 0
        for step, n in enumerate(self.step_iters, start=1):
            end += n
            if it < end:
                return step
        return 4

    # --- hook API -------------------------------------------------------------------------------------------------
    def before_train(self):
        self.attach(self.trainer.model)

    def before_step(self):
        self.apply_step(self.step_at(self.trainer.iter))

    def after_train(self):
        self.detach()

    # --- usable without a trainer (tests, custom loops) ---------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Register the loss-detaching forward hook on ``model`` (a GeneralizedRCNN, possibly DDP-wrapped)."""
        self.detach()
        self._model = _unwrap(model)
        for attr in _PARTS.values():
            if not isinstance(getattr(self._model, attr, None), nn.Module):
                raise ValueError(f"alternating schedule needs a model with .{attr} (GeneralizedRCNN)")
        self._handle = self._model.register_forward_hook(self._detach_losses)

    def detach(self) -> None:
        """Remove the forward hook and unfreeze everything."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._model is not None:
            for attr in _PARTS.values():
                getattr(self._model, attr).requires_grad_(True)
        self.current_step = None

    def apply_step(self, step: int) -> None:
        """Freeze/unfreeze the model parts for ``step`` (1..4)."""
        assert self._model is not None, "call attach(model) first"
        assert step in STEP_FROZEN, step
        if step != self.current_step:
            logger.info("Alternating schedule: step %d (frozen: %s)", step, ", ".join(sorted(STEP_FROZEN[step])))
        self.current_step = step
        for part, attr in _PARTS.items():
            module: nn.Module = getattr(self._model, attr)
            frozen = part in STEP_FROZEN[step]
            for p in module.parameters():
                p.requires_grad_(not frozen)
                if frozen:
                    p.grad = None
            if part == "backbone" and self._model.training:
                # fixed norm statistics while frozen (re-applied every step: EvalHook calls model.train())
                module.train(not frozen)

    def _detach_losses(self, module: nn.Module, inputs, output):
        if not module.training or not isinstance(output, dict) or self.current_step is None:
            return output
        off = STEP_DETACHED[self.current_step]
        out = {}
        for k, v in output.items():
            is_off = _is_rpn_loss(k) if off == "rpn" else (k.startswith("loss_") and not _is_rpn_loss(k))
            out[k] = v.detach() if is_off and isinstance(v, torch.Tensor) else v
        return out


class BMDHeadOnlyHook(HookBase):
    """Train ``roi_heads.bmd_head`` alone (see module docstring); usable without a trainer via :meth:`attach`."""

    TRAINED = "roi_heads.bmd_head."

    def __init__(self):
        super().__init__()
        self._handle = None
        self._model: Optional[nn.Module] = None

    def before_train(self):
        self.attach(self.trainer.model)

    def before_step(self):
        if self._model is not None and self._model.training:
            self._model.backbone.train(False)  # fixed norm statistics (EvalHook calls model.train())

    def after_train(self):
        self.detach()

    def attach(self, model: nn.Module) -> None:
        """Freeze all but the BMD branch and register the loss-detaching hook on ``model`` (a GeneralizedRCNN)."""
        self.detach()
        self._model = _unwrap(model)
        heads = getattr(self._model, "roi_heads", None)
        if not isinstance(getattr(heads, "bmd_head", None), nn.Module):
            raise ValueError("SOLVER.ALTERNATING.MODE 'bmd_head' needs a model with a BMD branch (MODEL.BMD_ON)")
        for name, p in self._model.named_parameters():
            trained = name.startswith(self.TRAINED)
            p.requires_grad_(trained)
            if not trained:
                p.grad = None
        logger.info("Training the BMD branch alone: %d of %d parameter tensors trained",
                    sum(p.requires_grad for p in self._model.parameters()), len(list(self._model.parameters())))
        self._handle = self._model.register_forward_hook(self._detach_losses)

    def detach(self) -> None:
        """Remove the hook and unfreeze everything."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._model is not None:
            self._model.requires_grad_(True)
        self._model = None

    @staticmethod
    def _detach_losses(module: nn.Module, inputs, output):
        if not module.training or not isinstance(output, dict):
            return output
        return {k: (v.detach() if k != "loss_bmd" and isinstance(v, torch.Tensor) else v) for k, v in output.items()}


def build_schedule_hooks(cfg) -> List[HookBase]:
    """Hooks for ``cfg.SOLVER.ALTERNATING``: ``[]`` for ``"joint"``, ``[AlternatingScheduleHook]`` for
    ``"alternating"``, ``[BMDHeadOnlyHook]`` for ``"bmd_head"``. Add them first in ``DefaultTrainer.build_hooks``."""
    mode = cfg.SOLVER.ALTERNATING.MODE
    if mode == "joint":
        return []
    if mode == "bmd_head":
        return [BMDHeadOnlyHook()]
    if mode != "alternating":
        raise ValueError(f"SOLVER.ALTERNATING.MODE must be 'joint', 'alternating' or 'bmd_head', got {mode!r}")
    steps = list(cfg.SOLVER.ALTERNATING.STEP_ITERS)
    if sum(steps) != cfg.SOLVER.MAX_ITER:
        logger.warning("SOLVER.ALTERNATING.STEP_ITERS %s sum to %d, not SOLVER.MAX_ITER=%d (later iterations stay "
                       "in step 4)", steps, sum(steps), cfg.SOLVER.MAX_ITER)
    return [AlternatingScheduleHook(step_iters=steps)]


def frozen_parameter_names(model: nn.Module) -> Iterable[str]:
    """Names of parameters with ``requires_grad=False`` (for logging/tests)."""
    return [n for n, p in _unwrap(model).named_parameters() if not p.requires_grad]
