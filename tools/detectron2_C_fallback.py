"""Stand-in for the compiled ``detectron2._C`` extension.

The registry sdist of Detectron2 v0.6 ships only Python sources, so bmd_d2's bootstrap installs it as pure Python and
puts this module in place of the missing extension. A standard axis-aligned Mask R-CNN (what bmd_d2 uses) never calls
it. Anything that does gets an error naming the compiled op and how to get it, instead of a bare import failure.

Installed by ``tools/bootstrap.sh`` as ``detectron2/_C.py``; never imported from bmd_d2 itself.
"""

# Compiled ops of detectron2/layers/csrc and what needs them, for the error message.
_OPS = {
    "box_iou_rotated": "rotated boxes (RotatedBoxes IoU)",
    "nms_rotated": "rotated boxes (rotated NMS)",
    "roi_align_rotated_forward": "rotated boxes (ROIAlignRotated)",
    "roi_align_rotated_backward": "rotated boxes (ROIAlignRotated)",
    "deform_conv_forward": "deformable convolution (DeformConv)",
    "deform_conv_backward_input": "deformable convolution (DeformConv)",
    "deform_conv_backward_filter": "deformable convolution (DeformConv)",
    "modulated_deform_conv_forward": "deformable convolution (ModulatedDeformConv)",
    "modulated_deform_conv_backward": "deformable convolution (ModulatedDeformConv)",
    "COCOevalAccumulate": "fast COCO evaluation (COCOeval_opt; use COCOEvaluator(..., use_fast_impl=False))",
    "COCOevalEvaluateImages": "fast COCO evaluation (COCOeval_opt; use COCOEvaluator(..., use_fast_impl=False))",
    "InstanceAnnotation": "fast COCO evaluation (COCOeval_opt; use COCOEvaluator(..., use_fast_impl=False))",
    "ImageEvaluation": "fast COCO evaluation (COCOeval_opt; use COCOEvaluator(..., use_fast_impl=False))",
}

IS_BMD_D2_FALLBACK = True


# Build information is not an op: Detectron2's collect_env_info() (called by default_setup) asks for it, and the
# truthful answer is that nothing was compiled.
def get_compiler_version() -> str:
    return "none (pure-Python Detectron2, no compiled extension)"


def get_cuda_version() -> str:
    return "none (pure-Python Detectron2, no compiled extension)"


def has_cuda() -> bool:
    return False


class MissingCompiledOpError(AttributeError):
    """Raised for every compiled op: an AttributeError so that ``hasattr(_C, op)`` answers False."""


def __getattr__(name):
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    what = _OPS.get(name, "a compiled Detectron2 op")
    raise MissingCompiledOpError(
        f"detectron2._C.{name} is not available: this Detectron2 was installed as pure Python without its compiled "
        f"extension, so {what} cannot run. bmd_d2 does not need it; if you do, build Detectron2 from source "
        f"(see README, 'Installing with a GPU')."
    )
