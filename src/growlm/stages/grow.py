"""``train = "new"`` (the default): the paper's grow stage. The blocks this stage grew, the LM head and the final
norm train; the substrate and every earlier block stay frozen forever."""

from __future__ import annotations

from growlm.stages.base import StageKind, TrainSet, new_blocks, register, single


class New(StageKind):
    name = "new"
    sets_budget = True

    def check(self, stage):
        if stage.grow == 0 and stage.layers is None and stage.lora is None:
            return "a stage must grow blocks, train all/head, or train LoRA adapters"
        return None

    def phases(self, stage, shape, trainable_embedding):
        return single(self, stage, TrainSet(new_blocks(shape)))


register(New())
