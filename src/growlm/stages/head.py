"""``train = "head"``: only the LM head and the final norm train (with the stage's adapters, if any)."""

from __future__ import annotations

from growlm.stages.base import StageKind, TrainSet, register, single


class Head(StageKind):
    name = "head"
    structure = False  # a grown block would never train

    def phases(self, stage, shape, trainable_embedding):
        return single(self, stage, TrainSet(()))


register(Head())
