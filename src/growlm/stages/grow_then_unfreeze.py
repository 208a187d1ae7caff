"""``train = "new-then-all"``: grow, then unfreeze; two phases in one stage. First the new blocks, the LM head
and the final norm train over the frozen trunk (the paper's grow stage), then, for the stage's last
``unfreeze_tokens``, every block trains together (CGLS, arXiv 2506.11389; MSLT). Each phase is its own fit:
a fresh optimizer and learning-rate schedule, its own checkpoints and audit."""

from __future__ import annotations

from growlm.stages.base import Phase, StageKind, TrainSet, every_block, new_blocks, register


class NewThenAll(StageKind):
    name = "new-then-all"
    keys = ("unfreeze_tokens",)
    lora = False  # its second phase trains every block

    def check(self, stage):
        if stage.grow == 0 and stage.layers is None:
            return 'train = "new-then-all" grows blocks first: set grow (or layers)'
        if stage.unfreeze_tokens is None:
            return 'train = "new-then-all" needs unfreeze_tokens: how many of the stage\'s tokens train every block'
        if stage.unfreeze_tokens >= stage.tokens:
            return (f"unfreeze_tokens ({stage.unfreeze_tokens:,}) must be below tokens ({stage.tokens:,}): "
                    f"the first phase needs tokens too")
        return None

    def phases(self, stage, shape, trainable_embedding):
        first = stage.tokens - stage.unfreeze_tokens
        return [Phase("new", first, TrainSet(new_blocks(shape))),
                Phase("all", stage.unfreeze_tokens, TrainSet(every_block(shape), embedding=trainable_embedding))]


register(NewThenAll())
