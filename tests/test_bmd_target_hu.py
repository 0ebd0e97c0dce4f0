"""A BMD head that learns the trabecular HU (``MODEL.ROI_BMD_HEAD.TARGET "hu"``) and training it alone
(``SOLVER.ALTERNATING.MODE "bmd_head"``): its loss uses ``gt_trabecular_hu``, its output is ``pred_trabecular_hu``, the
measurement converts it with the study's calibration, and nothing but the BMD branch moves in training."""
import numpy as np
import pytest
import torch

from _model_fixtures import synthetic_sample, tiny_cfg
from bmd_d2.engine import build_schedule_hooks
from bmd_d2.engine.schedule import BMDHeadOnlyHook
from bmd_d2.measure.classical import Calibration
from bmd_d2.modeling.test_time_augmentation import merge_tta_passes
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

HU = {"MODEL.ROI_BMD_HEAD.TARGET": "hu", "MODEL.ROI_BMD_HEAD.BMD_MEAN": 150.0, "MODEL.ROI_BMD_HEAD.BMD_STD": 80.0}


def _sample_with_hu(hu_values=None):
    s = synthetic_sample()
    n = len(s["instances"])
    hu = hu_values if hu_values is not None else [100.0 + 40.0 * i for i in range(n)]
    s["instances"].gt_trabecular_hu = torch.tensor(hu, dtype=torch.float32)
    s["instances"].gt_bmd = torch.full((n,), float("nan"))  # the HU head must not need it
    return s


def _model(**overrides):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**overrides))
    model.train()
    return model


def test_hu_target_trains_on_trabecular_hu_and_predicts_hu():
    model = _model(**HU)
    assert model.roi_heads.bmd_head.target == "hu"
    with EventStorage(0):
        loss = model([_sample_with_hu()])["loss_bmd"]
        assert torch.isfinite(loss) and float(loss.detach()) > 0 and loss.requires_grad
        # every target unknown: the graph-connected zero, as for the BMD target
        zero = model([_sample_with_hu([float("nan")] * len(_sample_with_hu()["instances"]))])["loss_bmd"]
        assert float(zero) == 0.0 and zero.requires_grad
    sample = _sample_with_hu()
    sample["instances"].remove("gt_trabecular_hu")
    with EventStorage(0), pytest.raises(KeyError, match="gt_trabecular_hu"):
        model([sample])
    model.eval()
    cfg_low = tiny_cfg(**HU, **{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0})
    model2 = build_model(cfg_low)
    model2.load_state_dict(model.state_dict())
    model2.eval()
    with torch.no_grad():
        out = model2([synthetic_sample()])[0]["instances"]
    assert len(out) > 0 and out.has("pred_trabecular_hu") and not out.has("pred_bmd")
    assert out.pred_trabecular_hu.dtype == torch.float32 and torch.isfinite(out.pred_trabecular_hu).all()


def test_hu_target_loss_is_normalised_by_its_mean_and_std():
    """The predictor starts at ~0 (normalised), i.e. at BMD_MEAN: a target equal to it costs (almost) nothing, one
    3 STD away costs much more."""
    model = _model(**HU, **{"MODEL.ROI_BMD_HEAD.LOSS_TYPE": "l1"})
    n = len(synthetic_sample()["instances"])
    with EventStorage(0):
        near = float(model([_sample_with_hu([150.0] * n)])["loss_bmd"])
        far = float(model([_sample_with_hu([390.0] * n)])["loss_bmd"])
    assert near < 0.2 and 2.5 < far < 3.5, (near, far)


def test_bad_target_is_a_clear_error():
    with pytest.raises(ValueError, match="TARGET must be one of \\['bmd', 'hu', 'hu_correction'\\]"):
        build_model(tiny_cfg(**{"MODEL.ROI_BMD_HEAD.TARGET": "mg"}))


def test_bmd_head_only_freezes_everything_else_and_detaches_other_losses():
    model = _model(**HU)
    (hook,) = build_schedule_hooks(tiny_cfg(**{"SOLVER.ALTERNATING.MODE": "bmd_head"}))
    assert isinstance(hook, BMDHeadOnlyHook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hook.attach(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("roi_heads.bmd_head.") for n in trained)
    assert trained == {n for n, _ in model.roi_heads.bmd_head.named_parameters(prefix="roi_heads.bmd_head")}
    with EventStorage(0):
        for _ in range(2):
            hook.before_step()
            losses = model([_sample_with_hu()])
            assert {k for k, v in losses.items() if v.requires_grad} == {"loss_bmd"}
            opt.zero_grad(set_to_none=False)
            sum(losses.values()).backward()
            opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved <= trained, sorted(moved - trained)[:5]
    hook.detach()
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="BMD branch"):
        BMDHeadOnlyHook().attach(_model(**{"MODEL.BMD_ON": False}))


def _pass(boxes, hu=None, bmd=None):
    R = len(boxes)
    return {"boxes": np.asarray(boxes, float), "scores": np.ones(R), "classes": np.zeros(R, np.int64),
            "masks": None, "bmd": None if bmd is None else np.asarray(bmd, float),
            "hu": None if hu is None else np.asarray(hu, float)}


def test_tta_merges_learned_hu_like_bmd():
    ref = _pass([[0, 0, 10, 10], [20, 20, 30, 30]], hu=[100.0, 200.0])
    shifted = _pass([[1, 1, 11, 11], [21, 21, 31, 31]], hu=[110.0, 190.0])
    resized = _pass([[0, 0, 10, 10], [20, 20, 30, 30]])  # no learned values: does not count
    out = merge_tta_passes([ref, shifted, resized])
    np.testing.assert_allclose(out["hu"], [105.0, 195.0])
    assert out["bmd"] is None


def test_measurement_converts_learned_hu_with_the_study_calibration():
    from bmd_d2.measure import vertebrae as V

    cal = Calibration(slope=1.25, intercept=10.0, source="test")
    assert cal.hu_to_bmd(135.0) == pytest.approx(100.0)
    dets = V.detection_arrays({"boxes": [[0, 0, 4, 4]], "scores": [0.9], "classes": [0],
                               "masks": np.ones((1, 8, 8), bool), "bmd": None, "hu": np.array([135.0])}, (8, 8))
    assert dets["hu"][0] == 135.0 and dets["bmd"] is None


@pytest.mark.parametrize("flags", [[], ["metal"], ["implausible_hu"]])
def test_learned_hu_is_withheld_with_the_classical_value(flags):
    """Metal or an implausible HU in the core withholds every BMD, the learned one too; the head's HU stays."""
    from bmd_d2.config import get_bmd_cfg
    from bmd_d2.levels import Detection
    from bmd_d2.measure import vertebrae as V

    m = get_bmd_cfg().MEASURE
    cal = Calibration(slope=1.25, intercept=10.0, source="test")
    dets = V.detection_arrays({"boxes": [[0, 0, 4, 4]], "scores": [0.9], "classes": [0],
                               "masks": np.ones((1, 8, 8), bool), "bmd": None, "hu": np.array([135.0])}, (8, 8))
    cand = V.Candidate(index=0, flags=list(flags), roi=np.ones((8, 8), bool), hu=122.5, sd=10.0, n=64)
    v = V.measure_vertebra(dets, cand, Detection(0, 0.9, (0, 0, 4, 4), (2.0, 2.0)), "L1", [], cal, m,
                           V.roi_geometry(m, 1.0, None), volume=None, transform=np.eye(4))
    assert v.learned_hu == 135.0
    if flags:
        assert v.learned_bmd is None and v.classical_bmd is None and v.bmd is None and flags[0] in v.qc_flags
    else:
        assert v.learned_bmd == pytest.approx(100.0) and v.classical_bmd == pytest.approx(90.0)
