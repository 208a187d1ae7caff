"""Stage kinds, one file each (``grow``, ``whole``, ``head``, ``adapters``, ``grow_then_unfreeze``), registered by name in :data:`growlm.stages.base.STAGE_KINDS` (a plan's ``train``
value names one): ``new`` (the paper's grow stage), ``all``, ``head``, ``adapters`` and ``new-then-all``
(grow, then unfreeze). Importing this package registers the built-ins."""

from __future__ import annotations

from growlm.stages import adapters, grow, grow_then_unfreeze, head, whole  # noqa: F401  (each registers its kind)
from growlm.stages.base import STAGE_KINDS, Phase, Shape, StageKind, TrainSet, register, stage_kind

__all__ = ["STAGE_KINDS", "Phase", "Shape", "StageKind", "TrainSet", "register", "stage_kind"]
