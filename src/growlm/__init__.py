"""growlm: grow Transformers layer by layer over a frozen token substrate, and compose specialists.

The Python API mirrors the command line (see :mod:`growlm.api`)::

    import growlm

    run = growlm.train(growlm.load_plan("plan.toml"), "runs/a")
    print(growlm.evaluate(run / "stage-2", "ppl", data=["valid.txt"]))

The training loop lives in :mod:`growlm.training` and the evaluators in :mod:`growlm.evaluation`, so no
submodule shadows an API function of the same verb.
"""

from __future__ import annotations

from growlm.api import (
    Loaded,
    build_substrate,
    build_tokenizer,
    evaluate,
    export,
    generate,
    import_hf,
    info,
    load,
    load_plan,
    lora_merge,
    merge,
    plan_from_dict,
    prepare_data,
    train,
    verify,
)

__version__ = "0.1.0"

__all__ = ["Loaded", "Plan", "build_substrate", "build_tokenizer", "evaluate", "export", "generate", "import_hf", "info",
           "load", "load_plan", "lora_merge", "merge", "plan_from_dict", "prepare_data", "train", "verify"]


def __getattr__(name: str) -> object:
    if name == "Plan":  # pydantic is imported only when a plan is built
        from growlm.plan import Plan

        return Plan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
