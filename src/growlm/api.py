"""The Python API: what the ``growlm`` commands do, as functions (re-exported by ``import growlm``).

::

    import growlm

    tok = growlm.build_tokenizer("tok", corpus=["train.txt"], compact=True)     # = growlm tokenizer build
    sub = growlm.build_substrate("sub", "glyph", dim=256, tokenizer="tok")       # = growlm substrate build
    plan = growlm.load_plan("plan.toml")              # or growlm.plan_from_dict({...}, root)
    run = growlm.train(plan, "runs/a")                 # the run dir; RUN/stage-N after each stage
    growlm.info(run)                                   # = growlm info --json (a run, model, mixture or plan)
    growlm.verify(run)["ok"]                           # = growlm verify: checksums, lineage, audits
    scores = growlm.evaluate(run / "stage-2", "ppl", data=["valid.txt"])   # = growlm eval --json
    sweep = growlm.evaluate(run, "ppl", data=["valid.txt"], per_stage=True, save=True)
    print(growlm.generate(run / "stage-2", "To be, or not", max_new_tokens=32))
    growlm.lora_merge(run / "stage-2", "merged")       # LoRA adapters folded into the blocks
    mix = growlm.merge([run / "stage-1", run / "stage-2"], "mix")
    model, tokenizer = growlm.load(mix)                # a GrowLM or a Mixture, ready for inference
    growlm.export(run / "stage-2", "hf")               # a Hugging Face checkpoint
    growlm.import_hf("hf", "imported")                 # and back
    growlm.prepare_data(["corpus/"], "tok", "DATA")    # = growlm data prepare: token shards plans read by memmap

Every function is the library call its command makes (the CLI only parses and prints), so a result
here equals the command's. Errors are one-line :class:`growlm.errors.GrowlmError`. Nothing heavy is
imported until a function runs: ``import growlm`` stays fast.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from growlm.errors import GrowlmError

if TYPE_CHECKING:
    from growlm.plan import Plan
    from growlm.substrate import Substrate
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


def _check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work is done, an ``out`` that is not a dir or that holds something the caller did not
    ask to replace (and, like every writer, one inside a model dir, mixture or run)."""
    from growlm.store import check_out

    check_out(out)
    if out.is_symlink():
        raise GrowlmError(f"--out {out} is a symlink; give the directory itself")
    if out.exists() and not out.is_dir():
        raise GrowlmError(f"--out {out} exists and is not a directory")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise GrowlmError(f"--out {out} is not empty; pass --overwrite to replace it")


@contextmanager
def _output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temp dir to write into that replaces ``out`` only once complete (see :func:`_check_output_dir`).

    An existing ``out`` is swapped out by two renames and removed only after the new dir is in
    place, so at no point is ``out`` a half-written dir; on any failure it is left as it was.
    """
    from growlm.files import WriteError, atomic_dir

    _check_output_dir(out, overwrite)
    staging = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.new" if out.exists() else out
    try:
        with atomic_dir(staging) as tmp:
            yield tmp
        if staging != out:
            old = staging.with_suffix(".old")
            os.rename(out, old)
            try:
                os.rename(staging, out)
            except OSError:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except WriteError as e:  # name the caller's out, not our staging dir
        raise WriteError(out / e.path.name if e.path != staging else out, e.reason) from e
    except OSError as e:
        raise WriteError(out, str(e.strerror or e)) from e
    finally:
        if staging != out:
            shutil.rmtree(staging, ignore_errors=True)


def build_tokenizer(out: PathLike, *, corpus: Sequence[PathLike] | None = None, preset: str | None = None,
                    ngram_list: PathLike | None = None, compact: bool = False, ngrams: Sequence[int] = (2, 3),
                    top_k: int = 338, overwrite: bool = False) -> Tokenizer:
    """Build a bvv241-style tokenizer from ``corpus`` text files (``compact``: the code points seen, the
    specials and the mined n-grams of ``ngrams`` lengths, ``top_k`` per file and length), or the paper's
    exact vocabulary ``preset`` (with another ``ngram_list``), and save it to ``out`` (all or nothing;
    ``overwrite`` replaces a non-empty ``out``); as ``growlm tokenizer build`` does. Returns the tokenizer."""
    from growlm.tokenizer import build_preset
    from growlm.tokenizer import build_tokenizer as build

    out = _path(out, "build_tokenizer: out")
    _check_output_dir(out, overwrite)
    if preset:
        tok = build_preset(preset, _path(ngram_list, "ngram_list") if ngram_list else None)
    else:
        if not corpus:
            raise GrowlmError("give --corpus FILE... or --preset NAME")
        tok = build(_paths(corpus, "corpus"), compact=compact, ngrams=tuple(ngrams), top_k=top_k)
    with _output_dir(out, overwrite) as tmp:
        tok.save(tmp)
    return tok


def build_substrate(out: PathLike, kind: str, *, dim: int, tokenizer: PathLike | None = None,
                    vocab_size: int | None = None, bits: int | None = None, seed: int = 0,
                    params: Mapping[str, Any] | None = None, overwrite: bool = False) -> Substrate:
    """Build the frozen substrate ``kind`` (a registered kind: glyph, binary, random-bits, trainable, or a
    plugin's) of width ``dim`` for the tokenizer dir ``tokenizer`` (or ``vocab_size`` ids), with the kind's
    ``params``, and save it to ``out``; as ``growlm substrate build`` does. Returns the substrate."""
    from growlm.substrate import build_substrate as build
    from growlm.tokenizer import Tokenizer

    out = _path(out, "build_substrate: out")
    _check_output_dir(out, overwrite)
    tok = Tokenizer.load(_path(tokenizer, "tokenizer")) if tokenizer is not None else None
    if tok is None and vocab_size is None:
        raise GrowlmError("give --tokenizer DIR or --vocab-size N")
    sub = build(kind, dim=dim, tokenizer=tok, vocab_size=vocab_size, bits=bits, seed=seed, **dict(params or {}))
    with _output_dir(out, overwrite) as tmp:
        sub.save(tmp)
    return sub


def prepare_data(sources: PathLike | Sequence[PathLike], tokenizer: PathLike, out: PathLike, *,
                 workers: int | None = None, executor: str = "local", shuffle: bool = False,
                 valid_fraction: float = 0.0, slurm: Mapping[str, Any] | None = None,
                 log: Callable[[str], object] = print) -> Path:
    """Tokenize ``sources`` (files, folders, globs of text, JSONL, parquet, save_to_disk) with the tokenizer dir
    ``tokenizer`` into the prepared folder ``out`` that plans name like a file, on datatrove (``executor`` local,
    slurm or ray, ``workers`` at once); as ``growlm data prepare`` does. A rerun resumes. See
    :func:`growlm.prepare.prepare`."""
    from growlm.prepare import prepare

    slurm = dict(slurm or {})
    if executor != "slurm" and any(slurm.values()):
        raise GrowlmError("--partition and --time are for --executor slurm")
    return prepare([str(p) for p in _paths(sources, "sources")], _path(tokenizer, "tokenizer"),
                   _path(out, "prepare_data: out"), workers=workers, executor=executor, shuffle=shuffle,
                   valid_fraction=valid_fraction, slurm=slurm, log=log)


def train(plan: Plan | Mapping[str, Any] | PathLike, out: PathLike, *, resume: bool = False, progress: bool = True,
          log: Callable[[str], object] = print, tensorboard: bool | None = None) -> Path:
    """Run every stage of ``plan`` (a :class:`~growlm.plan.Plan`, a plan file, or the plan's tables as a dict,
    its paths relative to the current directory) into the run dir ``out``, as ``growlm train`` does; returns the
    run dir (its models are ``RUN/stage-N``).

    ``resume=True`` continues a stopped run of the same plan. ``progress`` shows a progress bar,
    ``log`` receives the per-stage report lines; ``tensorboard`` (when not None) overrides the plan's
    ``train.tensorboard`` (scalars in RUN/tensorboard). A run started from a Plan object
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
    run_plan(plan, out, resume=resume, progress=progress, log=log, tensorboard=tensorboard)
    return out


@dataclass(frozen=True)
class Loaded:
    """A model or a mixture loaded for inference (eval mode, on the CPU), with its tokenizer, the
    dir it came from and the fingerprint recorded there. Unpacks as ``model, tokenizer = growlm.load(path)``."""

    model: Any  # a growlm.model.GrowLM, or a growlm.mixture.Mixture
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
    from growlm.loading import fingerprint_of, load_any

    path = _path(path, "load")
    model, tokenizer = load_any(path)
    return Loaded(model, tokenizer, path, fingerprint_of(path), _state_sha256(model))


def evaluate(model_or_path: Loaded | PathLike, task: str, *, data: PathLike | Sequence[PathLike] | None = None,
             protocol: str | None = None, limit: int | None = None, runs: int | None = None, seed: int = 0,
             sample: bool = False, per_stage: bool = False, save: bool = False, progress: bool = True,
             log: Callable[[str], object] = print) -> dict | list[dict]:
    """Score a model on ``task`` (``ppl`` or a benchmark); returns the dict ``growlm eval --json`` prints
    (a list of them, one per stage, with ``per_stage``).

    ``model_or_path``: a model, stage or mixture dir, scored as stored there; or what :func:`load`
    returned (or its unpacked ``(model, tokenizer)``), scored as it is in memory now (nothing is read
    again). Its ``model_fingerprint`` is the recorded one while its tensors are those loaded, and None once
    they were changed: those scores belong to no stored model. ``data``: the task's data (``ppl``: text
    files, required; a benchmark: its files or ``hf:NAME``, default the offline packages). ``protocol``:
    ``paper`` (default) or ``loglik``. ``limit``: items per run (``ppl``: the first ``limit`` files).
    ``per_stage``: every stage of the run ``model_or_path`` (the depth sweep). ``save``: append each result
    to the scored dir's ``evals.jsonl`` (each stage's, with ``per_stage``), which the exported model card
    shows; ``log`` receives where. See :func:`growlm.evaluation.run.evaluate`.
    """
    from growlm.evaluation.run import evaluate as score
    from growlm.evaluation.run import evaluate_model, evaluate_per_stage

    options = dict(data=data, protocol=protocol or "paper", limit=limit, runs=runs, seed=seed, sample=sample,
                   progress=progress)
    in_memory = isinstance(model_or_path, Loaded) or (isinstance(model_or_path, tuple) and len(model_or_path) == 2)
    if in_memory and (per_stage or save):
        raise GrowlmError("per_stage and save score stored dirs: pass a run or model dir, not a loaded model")
    if isinstance(model_or_path, Loaded):
        fingerprint = model_or_path.fingerprint if model_or_path.unchanged() else None
        return evaluate_model(model_or_path.model, model_or_path.tokenizer, task, name=str(model_or_path.path),
                              fingerprint=fingerprint, **options)
    if in_memory:  # model, tokenizer = growlm.load(...)
        model, tokenizer = model_or_path  # no dir, no record: its scores claim no stored fingerprint
        return evaluate_model(model, tokenizer, task, name=type(model).__name__, fingerprint=None, **options)
    if not isinstance(model_or_path, str | os.PathLike):
        raise GrowlmError(f"evaluate: a model dir, growlm.load()'s result or its (model, tokenizer), not "
                          f"{type(model_or_path).__name__}")
    path = _path(model_or_path, "evaluate")
    if save:
        from growlm.store import MixtureDir, resolve

        # a mixture records every file it holds (mixture.json), so a sidecar would make it unverifiable;
        # refused before any scoring is spent
        if isinstance(resolve(path), MixtureDir):
            raise GrowlmError(f"--save stores results beside a model dir or run stage; {path} is a mixture, whose "
                              f"files are all recorded in its mixture.json: drop --save and keep the printed result")
    results = evaluate_per_stage(path, task, **options) if per_stage else [score(path, task, **options)]
    if save:
        from growlm.model_card import save_eval
        from growlm.store import stage_dir

        # a result goes beside the model it scored: each stage of a sweep to its own stage dir
        files = [str(d) for d in _paths(data, "data")] if data else None
        for r in results:
            log(f"saved to {save_eval(stage_dir(path, r['stage']) if per_stage else path, r, files)}")
    return results if per_stage else results[0]


def generate(model_or_path: Loaded | PathLike, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0) -> str:
    """The prompt and its continuation by the model (a dir, or :func:`load`'s result): KV-cached, greedy
    at ``temperature`` 0, else sampled (from the ``top_k`` most likely tokens) with ``seed``; as
    ``growlm generate`` prints it."""
    import torch

    if not isinstance(prompt, str):
        raise GrowlmError(f"prompt: a string, not {type(prompt).__name__}")
    for name, value in (("max_new_tokens", max_new_tokens), ("seed", seed), ("top_k", top_k)):
        if not (isinstance(value, int) and not isinstance(value, bool)) and not (name == "top_k" and value is None):
            raise GrowlmError(f"--{name.replace('_', '-')}: a whole number, not {value!r:.40}")
    if not isinstance(temperature, int | float) or not (math.isfinite(temperature) and temperature >= 0):
        raise GrowlmError(f"--temperature must be a finite number >= 0 (0 is greedy), got {temperature!r:.40}")
    if top_k is not None and top_k < 1:
        raise GrowlmError(f"--top-k must be a positive number of tokens, got {top_k}")
    if max_new_tokens < 0:
        raise GrowlmError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    lm, tok = (model_or_path.model, model_or_path.tokenizer) if isinstance(model_or_path, Loaded) else \
        load(model_or_path)
    ids = tok.encode(prompt)
    if not ids:
        raise GrowlmError("the prompt encodes to no tokens")
    out = lm.generate(torch.tensor([ids]), max_new_tokens, temperature=float(temperature), top_k=top_k,
                      generator=torch.Generator().manual_seed(seed))
    return prompt + tok.decode(out[0, len(ids):].tolist())


def info(path: PathLike | None = None, *, preset: str | None = None) -> dict:
    """What a model dir, run (its stages), mixture or plan file is, or a ``preset`` config (its exact
    parameter counts); the dict ``growlm info --json`` prints."""
    from growlm.inspection import info_model, info_preset

    if preset is not None:
        return info_preset(preset)
    if path is None:
        raise GrowlmError("give MODEL_DIR or --preset NAME")
    return info_model(_path(path, "info"))


def verify(path: PathLike) -> dict:
    """Prove a model dir, run or mixture is what its records say (checksums, fingerprints, the lineage's
    frozen tensors, each stage's audit against the plan the run recorded): ``{"ok", "lines", "problems"}``,
    as ``growlm verify --json`` prints it."""
    from growlm.verification import verify as check

    return check(_path(path, "verify"))


def lora_merge(path: PathLike, out: PathLike) -> Path:
    """Fold the LoRA adapters of the model dir ``path`` into its blocks (in fp32) and save the plain model
    to ``out``, its lineage naming the adapted model; as ``growlm lora-merge`` does. Returns ``out``."""
    from growlm.loading import load_model
    from growlm.lora import merge_adapters
    from growlm.store import check_out
    from growlm.store.model import save_model

    path, out = _path(path, "lora_merge"), _path(out, "lora_merge: out")
    check_out(out)
    saved = load_model(path)
    if not saved.model.lora_records:
        raise GrowlmError(f"{path} has no LoRA adapters to merge")
    model = merge_adapters(saved.model)
    record = saved.meta.to_json()
    keep = {k: record[k] for k in ("plan", "stage", "metrics", "params_active") if k in record}
    keep["merged_from"] = saved.meta.fingerprint
    save_model(model, out, tokenizer_dir=saved.tokenizer_dir, substrate=record["substrate"], extra=keep,
               lineage=saved.meta.lineage + [saved.meta.fingerprint])
    return out


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


def import_hf(hf_dir: PathLike, out: PathLike) -> Path:
    """Read a Hugging Face ``GPTNeoXForCausalLM`` checkpoint into the model dir ``out``, as ``growlm import``
    does; returns ``out``. See :func:`growlm.interop.import_hf`."""
    from growlm.interop import import_hf as read_hf
    from growlm.store import check_out

    out = _path(out, "import_hf: out")
    check_out(out)
    return read_hf(_path(hf_dir, "import_hf"), out)


def export(path: PathLike, out: PathLike) -> Path:
    """Write the model dir ``path`` as a Hugging Face ``GPTNeoXForCausalLM`` checkpoint in ``out``
    (LoRA adapters merged in), as ``growlm export`` does; returns ``out``. See :func:`growlm.interop.export_hf`."""
    from growlm.interop import export_hf
    from growlm.store import check_out

    out = _path(out, "export: out")
    check_out(out)
    return export_hf(_path(path, "export"), out)


__all__ = ["Loaded", "build_substrate", "build_tokenizer", "evaluate", "export", "generate", "import_hf", "info", "load",
           "load_plan", "lora_merge", "merge", "plan_from_dict", "prepare_data", "train", "verify"]
