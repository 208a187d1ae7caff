"""The Python API: what the ``growlm`` commands do, as functions (re-exported by ``import growlm``).

::

    import growlm

    plan = growlm.load_plan("plan.toml")              # or growlm.plan_from_dict({...}, root)
    run = growlm.train(plan, "runs/a")                 # the run dir; RUN/stage-N after each stage
    scores = growlm.evaluate(run / "stage-2", "ppl", data=["valid.txt"])   # = growlm eval --json
    mix = growlm.merge([run / "stage-1", run / "stage-2"], "mix")
    model, tokenizer = growlm.load(mix)                # a GrowLM or a Mixture, ready for inference
    growlm.export(run / "stage-2", "hf")               # a Hugging Face checkpoint

Every function is the library call its command makes (the CLI only parses and prints), so a result
here equals the command's. Errors are one-line :class:`growlm.errors.GrowlmError`. Nothing heavy is
imported until a function runs: ``import growlm`` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from growlm.errors import GrowlmError

if TYPE_CHECKING:
    from growlm.plan import Plan
    from growlm.tokenizer import Tokenizer

PathLike = str | os.PathLike[str]


def load_plan(path: PathLike, *, check_paths: bool = True) -> Plan:
    """Read and validate a plan file (TOML, or the JSON of a run's ``RUN/plan.json``); its paths
    come back absolute, relative to the file. See :func:`growlm.plan.load_plan`."""
    from growlm.plan import load_plan as read_plan

    return read_plan(_path(path, "load_plan"), check_paths=check_paths)


def plan_from_dict(raw: Mapping[str, Any], root: PathLike | None = None, *, check_paths: bool = True) -> Plan:
    """A plan from the tables a plan file holds, as Python values, validated like a file; relative
    paths resolve against ``root`` (default: the current directory). See :func:`growlm.plan.plan_from_dict`."""
    from growlm.plan import plan_from_dict as build_plan

    return build_plan(raw, root, check_paths=check_paths)


def train(plan: Plan | Mapping[str, Any] | PathLike, out: PathLike, *, resume: bool = False, progress: bool = True,
          log: Callable[[str], object] = print) -> Path:
    """Run every stage of ``plan`` (a :class:`~growlm.plan.Plan`, a plan file, or the plan's tables as a dict,
    its paths relative to the current directory) into the run dir ``out``, as ``growlm train`` does; returns the
    run dir (its models are ``RUN/stage-N``).

    ``resume=True`` continues a stopped run of the same plan. ``progress`` shows a progress bar,
    ``log`` receives the per-stage report lines. A run started from a Plan object
    records it in ``RUN/plan.json`` (there is no ``RUN/plan.toml``), so it resumes from the command
    line with ``growlm train RUN/plan.json --out RUN --resume``.
    """
    from growlm.plan import Plan
    from growlm.training import train as run_plan

    if isinstance(plan, Mapping):
        plan = plan_from_dict(plan)
    elif not isinstance(plan, Plan | str | os.PathLike):
        raise GrowlmError(f"plan: a Plan, a plan file or a dict of its tables, not {type(plan).__name__}")
    out = _path(out, "train: out")
    run_plan(plan, out, resume=resume, progress=progress, log=log)
    return out


@dataclass(frozen=True)
class Loaded:
    """A model or a mixture loaded for inference (eval mode, on the CPU), with its tokenizer, the
    dir it came from and the fingerprint recorded there. Unpacks as ``model, tokenizer = growlm.load(path)``."""

    model: Any  # a growlm.model.GrowLM, or a growlm.compose.Mixture
    tokenizer: Tokenizer
    path: Path
    fingerprint: str  # the model's, as recorded in its dir when it was loaded
    state_sha256: str = field(repr=False)  # of the state as loaded (tensors, LoRA scaling): tells a model changed since

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer))

    def unchanged(self) -> bool:
        """Whether the model still computes what it was loaded to compute: every tensor, and how its LoRA
        adapters apply (their scaling), as when it was loaded."""
        return _state_sha256(self.model) == self.state_sha256


def _state_sha256(model: Any) -> str:
    from hashlib import sha256

    from growlm.hashing import canonical_json, sha256_tensors
    from growlm.lora import lora_layers

    state = model.state_dict()
    h = sha256_tensors(state)
    if any(".lora_" in k for k in state):  # peft is loaded only then
        h += sha256(canonical_json({name: mod.scaling for name, mod in lora_layers(model)})).hexdigest()
    return h


def load(path: PathLike) -> Loaded:
    """The model dir, run stage or mixture dir at ``path``, fully verified, with its tokenizer."""
    from growlm.evaluation import fingerprint_of, load_any

    path = _path(path, "load")
    model, tokenizer = load_any(path)
    return Loaded(model, tokenizer, path, fingerprint_of(path), _state_sha256(model))


def evaluate(model_or_path: Loaded | PathLike, task: str, *, data: PathLike | Sequence[PathLike] | None = None,
             protocol: str | None = None, limit: int | None = None, runs: int | None = None, seed: int = 0,
             sample: bool = False, progress: bool = True) -> dict:
    """Score a model on ``task`` (``ppl`` or a benchmark); returns the dict ``growlm eval --json`` prints.

    ``model_or_path``: a model, stage or mixture dir, scored as stored there; or what :func:`load`
    returned (or its unpacked ``(model, tokenizer)``), scored as it is in memory now (nothing is read again). Its ``model_fingerprint`` is the
    recorded one while its tensors are those loaded, and None once they were changed: those scores
    belong to no stored model. ``data``: the task's data (``ppl``: text files, required; a benchmark: its files or ``hf:NAME``,
    default the offline packages). ``protocol``: ``paper`` (default) or ``loglik``. ``limit``: items
    per run (``ppl``: the first ``limit`` files). See :func:`growlm.evaluation.run.evaluate`.
    """
    from growlm.evaluation.run import evaluate as score
    from growlm.evaluation.run import evaluate_model

    options = dict(data=data, protocol=protocol or "paper", limit=limit, runs=runs, seed=seed, sample=sample,
                   progress=progress)
    if isinstance(model_or_path, Loaded):
        fingerprint = model_or_path.fingerprint if model_or_path.unchanged() else None
        return evaluate_model(model_or_path.model, model_or_path.tokenizer, task, name=str(model_or_path.path),
                              fingerprint=fingerprint, **options)
    if isinstance(model_or_path, tuple) and len(model_or_path) == 2:  # model, tokenizer = growlm.load(...)
        model, tokenizer = model_or_path  # no dir, no record: its scores claim no stored fingerprint
        return evaluate_model(model, tokenizer, task, name=type(model).__name__, fingerprint=None, **options)
    if not isinstance(model_or_path, str | os.PathLike):
        raise GrowlmError(f"evaluate: a model dir, growlm.load()'s result or its (model, tokenizer), not "
                          f"{type(model_or_path).__name__}")
    return score(_path(model_or_path, "evaluate"), task, **options)


def merge(paths: Sequence[PathLike], out: PathLike, *, combine: str = "mean-logits",
          weights: Sequence[float] | None = None, space: str = "logits", router: bool = False,
          finetune_head: bool = False, data: PathLike | Sequence[PathLike] | None = None, tokens: int = 32768,
          lr: float = 1e-3, progress: bool = True) -> Path:
    """Compose experts (model dirs, or mixture dirs: their experts) over one substrate into the
    mixture dir ``out``, as ``growlm merge`` does; returns ``out``.

    ``combine``: ``mean-logits`` (the paper's), ``mean-probs`` or ``weighted`` (with ``weights``,
    one per expert, acting in ``space``: ``logits`` or ``probs``). ``router`` trains a per-token
    gate and ``finetune_head`` the output layers, on ``data`` (text files) for ``tokens`` tokens
    at ``lr``. See :func:`growlm.compose.merge`.
    """
    from growlm.compose import Tuning
    from growlm.compose import merge as compose
    from growlm.store import check_out

    out = _path(out, "merge: out")
    check_out(out)
    tuning = None
    if router or finetune_head:
        tuning = Tuning(data=_paths(data, "merge: data"), router=router, head=finetune_head, tokens=tokens, lr=lr,
                        progress=progress)
    elif data:
        raise GrowlmError("--data only applies to --router or --finetune-head")
    return compose(_paths(paths, "merge: paths"), out, combine=combine, weights=weights, space=space, tuning=tuning)


def _path(value: object, what: str) -> Path:
    """``value`` as a path, or a one-line GrowlmError naming the argument (the API is typed, its callers are not)."""
    if not isinstance(value, str | os.PathLike) or isinstance(value, bytes) or not str(value) or "\0" in str(value):
        raise GrowlmError(f"{what}: a path (str or os.PathLike) with no NUL byte, not {type(value).__name__} "
                          f"{str(value)[:40]!r}")
    return Path(value)


def _paths(paths: PathLike | Sequence[PathLike] | None, what: str) -> list[Path]:
    """One path or several as a list (a lone string is one path, not a sequence of characters)."""
    if paths is None:
        return []
    if isinstance(paths, str | os.PathLike):
        return [_path(paths, what)]
    if not isinstance(paths, Sequence) or isinstance(paths, bytes):
        raise GrowlmError(f"{what}: a path or a list of paths, not {type(paths).__name__}")
    return [_path(p, f"{what}[{i}]") for i, p in enumerate(paths)]


def export(path: PathLike, out: PathLike) -> Path:
    """Write the model dir ``path`` as a Hugging Face ``GPTNeoXForCausalLM`` checkpoint in ``out``
    (LoRA adapters merged in), as ``growlm export`` does; returns ``out``. See :func:`growlm.interop.export_hf`."""
    from growlm.interop import export_hf
    from growlm.store import check_out

    out = _path(out, "export: out")
    check_out(out)
    return export_hf(_path(path, "export"), out)


__all__ = ["Loaded", "evaluate", "export", "load", "load_plan", "merge", "plan_from_dict", "train"]
