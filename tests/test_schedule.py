"""Alternating 4-step schedule: each step freezes the right parameters, and frozen ones do not move over an SGD
step with momentum and weight decay."""
import pytest
import torch

from _model_fixtures import synthetic_sample, tiny_cfg
from bmd_d2.engine import AlternatingScheduleHook, build_schedule_hooks
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

PARTS = {"backbone": "backbone", "rpn": "proposal_generator", "heads": "roi_heads"}
FROZEN = {1: {"heads"}, 2: {"rpn"}, 3: {"backbone", "heads"}, 4: {"backbone", "rpn"}}


def _snapshot(model):
    return {part: [p.detach().clone() for p in getattr(model, attr).parameters()] for part, attr in PARTS.items()}


def _changed(model, snap, part):
    now = list(getattr(model, PARTS[part]).parameters())
    return any(not torch.equal(a, b.detach()) for a, b in zip(snap[part], now))


def test_build_schedule_hooks():
    assert build_schedule_hooks(tiny_cfg()) == []
    cfg = tiny_cfg(**{"SOLVER.ALTERNATING.MODE": "alternating", "SOLVER.ALTERNATING.STEP_ITERS": [3, 3, 2, 2]})
    (hook,) = build_schedule_hooks(cfg)
    assert [hook.step_at(i) for i in range(12)] == [1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 4]
    with pytest.raises(ValueError):
        build_schedule_hooks(tiny_cfg(**{"SOLVER.ALTERNATING.MODE": "sometimes"}))


def test_each_step_freezes_and_frozen_params_do_not_move():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01)
    batch = [synthetic_sample()]
    hook = AlternatingScheduleHook(step_iters=[1, 1, 1, 1])
    hook.attach(model)
    with EventStorage(0):
        # one joint step first so every parameter has a momentum buffer
        opt.zero_grad()
        sum(model(batch).values()).backward()
        opt.step()
        for step in (1, 2, 3, 4):
            hook.apply_step(step)
            for part, attr in PARTS.items():
                req = {p.requires_grad for p in getattr(model, attr).parameters()}
                assert req == {part not in FROZEN[step]}, (step, part)
            snap = _snapshot(model)
            losses = model(batch)
            off_rpn = step in (2, 4)
            for k, v in losses.items():
                assert v.requires_grad == (k.startswith("loss_rpn") != off_rpn), (step, k)
            opt.zero_grad(set_to_none=False)  # worst case: zeroed grads instead of None
            sum(losses.values()).backward()
            opt.step()
            for part in PARTS:
                assert _changed(model, snap, part) == (part not in FROZEN[step]), (step, part)
    hook.detach()
    assert all(p.requires_grad for p in model.parameters())


def test_hook_in_detectron2_trainer():
    """Through SimpleTrainer: after steps 3-4 (iterations 2, 3) the backbone equals its state after step 2."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01)
    batch = [synthetic_sample()]
    loader = iter(lambda: batch, None)  # endless
    trainer = SimpleTrainer(model, loader, opt)
    seen = {}

    class Record(HookBase):
        def after_step(self):
            seen[self.trainer.iter] = _snapshot(model)

    trainer.register_hooks([AlternatingScheduleHook(step_iters=[1, 1, 1, 1]), Record()])
    trainer.train(0, 4)
    assert _changed(model, seen[0], "backbone")  # step 2 trains the backbone
    assert not _changed(model, seen[1], "backbone")  # steps 3 and 4 keep it
    assert not _changed(model, seen[2], "rpn")  # step 4 freezes the RPN
    assert _changed(model, seen[2], "heads")
    assert all(p.requires_grad for p in model.parameters())  # unfrozen after training
