"""``train = "all"``: every block, the LM head and final norm (and a trainable substrate's table) train. A
monolithic model, the paper's unfrozen first stage, a joint phase at the end of a grown schedule, or one late
expansion (``grow = k`` with ``init``, Bu et al. arXiv 2511.04981) or depth stacking (``layers``) trained whole."""

from __future__ import annotations

from growlm.stages.base import StageKind, TrainSet, every_block, register, single


class All(StageKind):
    name = "all"
    lora = False  # it already trains every block

    def phases(self, stage, shape, trainable_embedding):
        return single(self, stage, TrainSet(every_block(shape), embedding=trainable_embedding))


register(All())
