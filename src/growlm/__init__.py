"""growlm: grow Transformers layer by layer over a frozen token substrate, and compose specialists.

The Python API mirrors the command line (see :mod:`growlm.api`)::

    import growlm

    run = growlm.train(growlm.load_plan("plan.toml"), "runs/a")
    print(growlm.evaluate(run / "stage-2", "ppl", data=["valid.txt"]))
"""

from __future__ import annotations

import importlib
import sys
import types

from growlm.api import Loaded, export, load, load_plan, merge, plan_from_dict

__version__ = "0.1.0"

__all__ = ["Loaded", "Plan", "evaluate", "export", "load", "load_plan", "merge", "plan_from_dict", "train"]

# ``growlm.train`` and ``growlm.evaluate`` name submodules too, and importing a submodule rebinds the
# package's attribute to it (``import growlm.train as t`` must keep giving the module). So these two
# attributes are the submodules themselves, made callable: ``growlm.train(plan, out)`` runs
# ``growlm.api.train(plan, out)``. Each is imported on first use: torch is heavy, and ``growlm --help``
# imports this package.
_CALLABLE_SUBMODULES = ("train", "evaluate")


class _CallableModule(types.ModuleType):
    """A submodule that, called, runs the :mod:`growlm.api` function of its name."""

    def __call__(self, *args, **kwargs):
        from growlm import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    """This package: the two submodules above become callable as the import system binds them."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _CALLABLE_SUBMODULES and isinstance(value, types.ModuleType) \
                and value.__name__ == f"{self.__name__}.{name}":
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


def __getattr__(name: str) -> object:
    if name in _CALLABLE_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "Plan":  # pydantic is imported only when a plan is built
        from growlm.plan import Plan

        return Plan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package
