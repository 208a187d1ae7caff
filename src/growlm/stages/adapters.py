"""``train = "adapters"``: nothing but the stage's own LoRA adapters train (the head too stays frozen)."""

from __future__ import annotations

from growlm.stages.base import StageKind, TrainSet, register, single


class Adapters(StageKind):
    name = "adapters"
    structure = False
    needs_lora = True

    def phases(self, stage, shape, trainable_embedding):
        return single(self, stage, TrainSet((), head=False))


register(Adapters())
