"""Measure a CT study with a trained bmd_d2 model: volume → sagittal image → model → :class:`StudyResult`.

:class:`BMDStudyPredictor` builds the model once (the weights file and the calibration file are read once each),
wraps it in :class:`~bmd_d2.modeling.test_time_augmentation.BMDRCNNWithTTA` (test-time resize, shifts and sizes) and
hands the detections to :func:`~bmd_d2.measure.vertebrae.measure_detections`.
"""
import logging
import os
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from .classical import base_calibration, calibration_method, with_internal_reference
from .result import StudyResult
from .vertebrae import measure_detections

__all__ = ["BMDStudyPredictor", "measure_detections", "sagittal_from_cfg"]

logger = logging.getLogger(__name__)


def sagittal_from_cfg(volume, cfg):
    """``make_sagittal`` with the ``INPUT.DICOM`` settings (spacing, size, slices, window) used in training."""
    from bmd_d2.data.datasets import params_from_cfg
    from bmd_d2.data.sagittal import make_sagittal

    return make_sagittal(volume, **params_from_cfg(cfg))


class BMDStudyPredictor:
    """Measure CT studies with a trained bmd_d2 model.

    Example::

        cfg = get_bmd_cfg("configs/bmd_rcnn_MFEFPN_R18_1x.yaml", ["MODEL.WEIGHTS", "model_final.pth"])
        predictor = BMDStudyPredictor(cfg)
        result = predictor("path/to/dicom_folder")      # or a .nii.gz path, a list of files, or a Volume
        print(result.patient["acr_bmd"], [v.level for v in result.vertebrae])

    Attributes:
        model: the built Detectron2 model (eval mode, weights loaded).
        tta: the model wrapped for test-time resize, shifts and sizes (``MEASURE.TTA_SHIFTS`` / ``TTA_SIZES``).
        calibration: the HU → BMD calibration of ``MEASURE`` (file parsed once; the internal reference, when enabled,
            is applied per study); with ``calibration_method`` "internal" (``MEASURE.CALIBRATION`` "auto" without a
            file) each study's own internal calibration replaces it.
        calibration_method: "file", "internal" or "default" (:func:`~bmd_d2.measure.classical.calibration_method`).
        unchecked: config keys the weights could not be checked against (weights without a stored config).

    Args:
        cfg: a config built with ``add_bmd_config`` (``MODEL.WEIGHTS`` = trained weights; "" = random init).

    Raises:
        BMDError: unloadable weights, weights trained with another config, a bad calibration file or TTA setting.
    """

    def __init__(self, cfg):
        from detectron2.modeling import build_model

        from bmd_d2.checkpoint import BMDCheckpointer, check_weights_config, load_checkpoint_file
        from bmd_d2.modeling.test_time_augmentation import BMDRCNNWithTTA  # (bmd_d2.modeling registers the model)

        self.cfg = cfg.clone()
        self.cfg.freeze()
        weights = self.cfg.MODEL.WEIGHTS
        # the weights file is read once (weights-only, no pickle): for the check of its stored config and the model
        checkpoint = load_checkpoint_file(weights) if weights else None
        self.unchecked = check_weights_config(self.cfg, checkpoint=checkpoint)  # BMDError if the configs differ
        self.model = build_model(self.cfg)
        self.model.eval()
        if weights:
            BMDCheckpointer(self.model).load_preloaded(weights, checkpoint)
        # ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST) as BMDDatasetMapper does at test time: the model sees
        # exactly what evaluation feeds (tests/test_measure_cli.py checks it).
        self.tta = BMDRCNNWithTTA(self.cfg, self.model)
        self.calibration = base_calibration(self.cfg)
        self.calibration_method = calibration_method(self.cfg)

    def load(self, source) -> Any:
        """Load a study (DICOM folder/file/list, NIfTI path, or a ``Volume``) as a ``Volume``.

        HU are kept as int16 where that is exact (integer rescale, the usual CT case: half the memory, no float
        conversion); the sagittal sampling and the measurements interpolate them into float32.
        """
        from bmd_d2.data.dicom import Volume, load_volume

        if isinstance(source, Volume):
            return source
        return load_volume(source, series_uid=self.cfg.INPUT.DICOM.SERIES_UID or None, dtype="auto")

    def sagittal(self, volume):
        """The 3-slice sagittal ``SagittalImage`` of a volume, built exactly as for training."""
        return sagittal_from_cfg(volume, self.cfg)

    def model_image(self, sagittal) -> np.ndarray:
        """The ``(H, W, 3)`` image the model takes, channels in ``INPUT.FORMAT`` order, as the test mapper reads it.

        The mapper reads the sagittal PNG (channels = slices 0, 1, 2 as R, G, B) with ``INPUT.FORMAT``: "RGB" keeps
        the slice order, "BGR" reverses it. (The model gets this order directly: no reversal is undone later.)
        """
        image = sagittal.image if self.cfg.INPUT.FORMAT == "RGB" else sagittal.image[:, :, ::-1]
        return np.ascontiguousarray(image)

    def detect(self, sagittal) -> Dict[str, Optional[np.ndarray]]:
        """Run the model on a sagittal image with the configured test-time passes (:attr:`tta`); arrays as in
        :func:`~bmd_d2.modeling.test_time_augmentation.instances_to_arrays` at the image's size."""
        return self.tta(self.model_image(sagittal))

    def __call__(self, source: Union[str, os.PathLike, Sequence[str], Any], study_id: Optional[str] = None
                 ) -> StudyResult:
        """Measure one study.

        Args:
            source: DICOM folder/file/list, NIfTI path, or ``Volume``.
            study_id: id stored in the result (default: derived from the source path).

        Raises:
            BMDError: unreadable input or no spine-like image can be made of it.
        """
        from bmd_d2.utils.files import study_id_from_path

        volume = self.load(source)
        sid = study_id or study_id_from_path(volume.meta.get("source") or "study")
        sag = self.sagittal(volume)
        dets = self.detect(sag)
        # the internal calibration is fitted per study at the labelled vertebrae (measure_detections, calibration=None)
        calibration = None if self.calibration_method == "internal" else \
            with_internal_reference(self.calibration, self.cfg, volume.data)
        result = measure_detections(dets, sag, self.cfg, volume=volume, calibration=calibration, study_id=sid)
        result.model.update({"weights": os.path.basename(self.cfg.MODEL.WEIGHTS) if self.cfg.MODEL.WEIGHTS
                             else "(random init)", "meta_architecture": self.cfg.MODEL.META_ARCHITECTURE,
                             "tta_shifts": [list(t) for t in self.tta.shifts], "tta_sizes": list(self.tta.sizes)})
        return result
