"""``growlm``: the command line. Thin: it parses arguments and calls the library.

Verbs follow the workflow: ``tokenizer build`` → ``substrate build`` → ``train`` (grow) →
``lora-merge`` → ``merge`` (compose) → ``eval`` → ``export``/``import``; ``info``, ``generate``,
``verify`` and ``demo`` around them. A user mistake prints one line, ``growlm: error: ...``, and
exits with code 2 (130 after an interrupt); never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from argparse import SUPPRESS
from pathlib import Path
from typing import NoReturn

from growlm.errors import GrowlmError, one_line
from growlm.registry import registered

# ``eval`` warns when more of the text than this is <unk>: the model was never asked to predict it.
UNK_WARN_RATE = 0.01


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _ngram_lengths(text: str) -> tuple[int, ...]:
    """``--ngrams 2,3`` as integers, or a one-line error."""
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise GrowlmError(f"--ngrams takes comma-separated n-gram lengths such as 2,3; got {text!r}") from None


def _kind_params(kind: str, items: list[str]) -> dict[str, object]:
    """``--param KEY=VALUE ...`` as the substrate kind's parameters, typed by the Params model it registered."""
    from growlm.substrate.registry import get_kind

    given: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise GrowlmError(f"--param takes KEY=VALUE, got {item!r}")
        if key in ("bits", "seed"):  # the flags every kind is offered; two spellings could disagree
            raise GrowlmError(f"--param {key}: give it as --{key}")
        if key in given:
            raise GrowlmError(f"--param {key} is given twice")
        given[key] = value
    return get_kind(kind).from_text(given)


# ----------------------------------------------------------------------------------------------
# commands


def _given(a: argparse.Namespace, *names: str) -> dict[str, object]:
    """The options among ``names`` the user gave: the rest take the API function's own defaults (written once)."""
    return {n: getattr(a, n) for n in names if hasattr(a, n)}


def cmd_tokenizer_build(a: argparse.Namespace) -> None:
    from growlm.api import build_tokenizer

    kw = _given(a, "top_k")
    if hasattr(a, "ngrams"):
        kw["ngrams"] = _ngram_lengths(a.ngrams)
    tok = build_tokenizer(a.out, corpus=a.corpus, preset=a.preset, ngram_list=a.ngram_list, compact=a.compact,
                          overwrite=a.overwrite, **kw)
    print(f"tokenizer: {tok.vocab_size:,} tokens, fingerprint {tok.fingerprint} -> {a.out}")


def cmd_substrate_build(a: argparse.Namespace) -> None:
    from growlm.api import build_substrate

    sub = build_substrate(a.out, a.kind, dim=a.dim, tokenizer=a.tokenizer, vocab_size=a.vocab_size, bits=a.bits,
                          params=_kind_params(a.kind, a.param or []), overwrite=a.overwrite, **_given(a, "seed"))
    print(f"substrate {sub.kind}: [{sub.vocab_size:,}, {sub.dim}], fingerprint {sub.fingerprint} -> {a.out}")


def cmd_info(a: argparse.Namespace) -> None:
    from growlm.api import info as describe

    info = describe(a.model, preset=a.preset)
    if a.json:
        _print_json(info)
    else:
        for k, v in info.items():
            if k not in ("blocks", "lineage", "experts", "schedule"):
                print(f"{k:24s} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:24s} {v}")
        for st in info.get("schedule", ()):  # a plan's stages, one line per phase
            for ph in st["phases"]:
                print(f"{'stage ' + str(st['stage']):24s} depth {st['depth']}, train {st['train']!r}"
                      + (f", phase {ph['name']!r}" if len(st["phases"]) > 1 else "")
                      + f": {ph['tokens']:,} tokens, {ph['active_params']:,} active, {ph['flops']:.3g} FLOPs")


def cmd_train(a: argparse.Namespace) -> None:
    if a.nproc is not None and a.nproc < 1:
        raise GrowlmError(f"--nproc: at least 1 process, got {a.nproc}")
    if a.nproc is not None and a.nproc > 1:
        from growlm.data import check_batch_split
        from growlm.distributed import launch
        from growlm.growth import phases_problem
        from growlm.plan import load_plan
        from growlm.substrate.registry import kind_trains

        if a.tensorboard:  # the torchrun command line carries the plan, not this flag
            raise GrowlmError("--tensorboard does not reach the processes of --nproc; set [train] tensorboard = true "
                              "in the plan instead")
        # what every rank would refuse, refused once here, before torchrun starts them
        plan = load_plan(Path(a.plan))
        check_batch_split(plan.train.batch_size, a.nproc)
        if plan.base is None:  # a base's depth is known once it is loaded: the ranks check that plan
            problem = phases_problem(plan, 0, kind_trains(plan.substrate.kind), a.nproc)
            if problem:
                raise GrowlmError(problem)
        raise SystemExit(launch(a.plan, a.out, a.nproc, resume=a.resume))
    from growlm.api import train
    from growlm.distributed import world
    from growlm.store import stages

    run = train(a.plan, a.out, resume=a.resume, progress=not a.no_progress, tensorboard=True if a.tensorboard else None)
    if world()[0] == 0:  # under torchrun, one line, not one per rank
        print(f"done: {len(stages(run))} stages in {a.out}")


def cmd_lora_merge(a: argparse.Namespace) -> None:
    from growlm.api import info, lora_merge

    out = lora_merge(a.model, a.out)
    merged = info(out)
    print(f"merged the LoRA adapters of {a.model} into {out} (fingerprint {merged['fingerprint'][:12]})")


def cmd_generate(a: argparse.Namespace) -> None:
    from growlm.api import generate

    print(generate(a.model, a.prompt, **_given(a, "max_new_tokens", "temperature", "top_k", "seed")))


def cmd_eval(a: argparse.Namespace) -> None:
    from growlm.api import evaluate

    results = evaluate(a.model, a.task, data=a.data, sample=a.sample, per_stage=a.per_stage, save=a.save,
                       log=lambda line: print(line, file=sys.stderr), **_given(a, "protocol", "limit", "runs", "seed"))
    for r in results if a.per_stage else [results]:
        if a.json:
            # JSON has no NaN or Infinity (a score of nothing, or of a diverged model): those print as null
            print(json.dumps(json.loads(json.dumps(r), parse_constant=lambda _: None), ensure_ascii=False, allow_nan=False))
        else:
            print("  ".join(f"{k}={v}" for k, v in r.items() if not isinstance(v, dict | list)))
        if r.get("unk_rate", 0.0) > UNK_WARN_RATE:
            where = f"stage {r['stage']}: " if "stage" in r else ""
            print(f"growlm: warning: {where}{r['unk_rate']:.1%} of the evaluated tokens are <unk> (characters the "
                  f"tokenizer cannot hold); the score does not cover that text", file=sys.stderr)
    if a.per_stage:
        from growlm.files import WriteError
        from growlm.report import sweep_report

        try:
            md, png = sweep_report(results, Path(a.model) / "eval", a.task)
        except WriteError as e:  # the scores are printed above; only the saved copy is missing
            raise GrowlmError(f"the results are printed above, but the depth sweep report was not saved: {e}") from e
        print(f"depth sweep: {md} and {png}", file=sys.stderr)


def cmd_export(a: argparse.Namespace) -> None:
    from growlm.api import export

    out = export(a.model, a.out)
    print(f"exported {a.model} -> {out} (GPTNeoXForCausalLM; load with transformers.AutoModelForCausalLM)")


def cmd_import(a: argparse.Namespace) -> None:
    from growlm.api import import_hf

    out = import_hf(a.hf_dir, a.out)
    print(f"imported {a.hf_dir} -> {out}")


def _weights(text: str | None) -> list[float] | None:
    """``--weights 0.7,0.3`` as numbers, or a one-line error."""
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise GrowlmError(f"--weights must be comma-separated numbers, got {text!r}") from None


def cmd_merge(a: argparse.Namespace) -> None:
    from growlm.api import merge
    from growlm.compose import merge_summary

    out = merge(a.experts, a.out, weights=_weights(a.weights), router=a.router, finetune_head=a.finetune_head,
                data=a.data, **_given(a, "combine", "tokens", "lr"),
                **({"space": a.weighted_space} if hasattr(a, "weighted_space") else {}))
    print(merge_summary(out))


def cmd_verify(a: argparse.Namespace) -> None:
    from growlm.api import verify

    report = verify(a.path)
    if a.json:
        _print_json(report)
    else:
        for line in report["lines"]:
            print(line)
    if not report["ok"]:
        raise GrowlmError(f"verification failed for {a.path}: {report['problems'][0]}")


def cmd_demo(a: argparse.Namespace) -> None:
    if a.tune and a.study != "growth":
        raise GrowlmError("--tune: tunes the growth study's schedules; use it with --study growth")
    if a.tune and a.seeds is not None:
        raise GrowlmError("--tune runs one seed of its own, not --seeds")
    if a.study == "growth":
        from growlm.demo import growth_study

        default = "demo-out-growth-tuning" if a.tune else "demo-out-growth"
        growth_study(out=Path(a.out or default), quick=a.quick, force=a.force, seeds=a.seeds, tune=a.tune)
        return
    from growlm.demo import demo

    demo(out=Path(a.out or "demo-out"), quick=a.quick, force=a.force, seeds=a.seeds)


def cmd_data_prepare(a: argparse.Namespace) -> None:
    from growlm.api import prepare_data

    prepare_data(a.sources, a.tokenizer, a.out, workers=a.workers, executor=a.executor, shuffle=a.shuffle,
                 valid_fraction=a.valid_fraction, slurm={"partition": a.partition, "time": a.time})


# ----------------------------------------------------------------------------------------------
# parser


class _Parser(argparse.ArgumentParser):
    """argparse with growlm's errors: one line, ``growlm: error: --flag: why``, exit code 2, instead of
    a usage block; a bad choice lists the valid ones, read (from the registry) when the value is checked."""

    def _check_value(self, action: argparse.Action, value: object) -> None:
        # argparse's own message wraps the choices in its usage block; the sub-parsers are of this class too
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise argparse.ArgumentError(action, f"invalid choice {value!r}; choose one of: {choices}")

    def error(self, message: str) -> NoReturn:
        """Print ``message`` (argparse's "argument --flag: why", "argument " dropped) on one line; exit 2."""
        self.exit(2, f"growlm: error: {one_line(message.removeprefix('argument '))}\n")


def _default(verb: str, name: str) -> object:
    """The default of ``growlm.api.VERB``'s argument ``name``: the one place it is written (an option left out
    on the command line is not passed, so the function's own default applies)."""
    import inspect

    import growlm.api

    return inspect.signature(getattr(growlm.api, verb)).parameters[name].default


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="growlm", description="Grow language models layer by layer over a frozen substrate.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tk = sub.add_parser("tokenizer", help="build a bvv241-style Unicode tokenizer").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    b = tk.add_parser("build", help="build a tokenizer from a corpus or a preset")
    b.add_argument("--corpus", nargs="+", metavar="FILE")
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--compact", action="store_true", help="small vocabulary: code points seen + specials + n-grams")
    b.add_argument("--ngrams", default=SUPPRESS,
                   help=f"n-gram lengths to mine (default {','.join(map(str, _default('build_tokenizer', 'ngrams')))})")
    b.add_argument("--top-k", type=int, default=SUPPRESS,
                   help=f"n-grams kept per corpus file and length (default {_default('build_tokenizer', 'top_k')})")
    b.add_argument("--preset", help="bvv241-2-3: the paper's exact vocabulary, from the n-gram list shipped with growlm")
    b.add_argument("--ngram-list", metavar="FILE", help="another n-gram list for --preset (default: the shipped one)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (all or nothing)")
    b.set_defaults(func=cmd_tokenizer_build)

    sb = sub.add_parser("substrate", help="build a frozen token substrate").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    b = sb.add_parser("build", help="build a substrate matrix and its recipe")
    b.add_argument("--kind", required=True, choices=registered("growlm.substrate.registry", "SUBSTRATE_KINDS"),
                   metavar="KIND", help="%(choices)s")
    b.add_argument("--tokenizer", metavar="DIR")
    b.add_argument("--vocab-size", type=int)
    b.add_argument("--dim", type=int, required=True)
    b.add_argument("--bits", type=int, help="code width for binary/random-bits")
    b.add_argument("--seed", type=int, default=SUPPRESS)
    b.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a parameter of the kind, as its Params model types it (e.g. basis=vocab for glyph); "
                        "repeat for several")
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (all or nothing)")
    b.set_defaults(func=cmd_substrate_build)

    b = sub.add_parser("info", help="describe a model dir, run stage, mixture or preset")
    b.add_argument("model", nargs="?", metavar="MODEL")
    b.add_argument("--preset")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_info)

    b = sub.add_parser("train", help="run a growth plan")
    b.add_argument("plan", metavar="PLAN", help="a plan file: TOML, or JSON (e.g. a run's RUN/plan.json)")
    b.add_argument("--out", required=True, metavar="RUN")
    b.add_argument("--resume", action="store_true", help="continue a stopped run")
    b.add_argument("--nproc", type=int, default=None, help="launch N data-parallel processes with torchrun")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--tensorboard", action="store_true",
                   help="also write scalars to RUN/tensorboard (overrides the plan's train.tensorboard)")
    b.set_defaults(func=cmd_train)

    b = sub.add_parser("lora-merge", help="fold LoRA adapters into the base weights")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("--out", required=True, metavar="DIR")
    b.set_defaults(func=cmd_lora_merge)

    b = sub.add_parser("generate", help="generate text (KV-cached; greedy unless --temperature)")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("--prompt", required=True)
    b.add_argument("--max-new-tokens", type=int, default=SUPPRESS,
                   help=f"(default {_default('generate', 'max_new_tokens')})")
    b.add_argument("--temperature", type=float, default=SUPPRESS, help="0 (the default) is greedy")
    b.add_argument("--top-k", type=int, default=SUPPRESS)
    b.add_argument("--seed", type=int, default=SUPPRESS)
    b.set_defaults(func=cmd_generate)

    b = sub.add_parser("eval", help="perplexity and benchmarks")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("--task", required=True, choices=registered("growlm.evaluation.tasks", "TASKS"),
                   metavar="TASK", help="%(choices)s")
    b.add_argument("--data", nargs="+", metavar="PATH")
    b.add_argument("--protocol", choices=["paper", "loglik"], default=SUPPRESS, help="(default paper)")
    b.add_argument("--limit", type=int, default=SUPPRESS)
    b.add_argument("--runs", type=int, default=SUPPRESS)
    b.add_argument("--seed", type=int, default=SUPPRESS)
    b.add_argument("--sample", action="store_true", help="stochastic decoding, as the paper's runs")
    b.add_argument("--per-stage", action="store_true", help="evaluate every stage of a run (depth sweep)")
    b.add_argument("--save", action="store_true",
                   help="append the result to MODEL/evals.jsonl (each RUN/stage-N/ with --per-stage); "
                        "growlm export puts it in the model card")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_eval)

    b = sub.add_parser("export", help="export to a Hugging Face checkpoint")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("--to", choices=["hf"], default="hf")
    b.add_argument("--out", required=True, metavar="DIR")
    b.set_defaults(func=cmd_export)

    b = sub.add_parser("import", help="import a Hugging Face GPT-NeoX checkpoint")
    b.add_argument("hf_dir", metavar="HF_DIR")
    b.add_argument("--out", required=True, metavar="DIR")
    b.set_defaults(func=cmd_import)

    b = sub.add_parser("merge", help="compose experts over one substrate into a mixture")
    b.add_argument("experts", nargs="+", metavar="MODEL")
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--combine", choices=registered("growlm.rules", "RULES", lambda r: not r.trained),
                   default=SUPPRESS, metavar="RULE", help=f"%(choices)s (default {_default('merge', 'combine')})")
    b.add_argument("--weights", help="w1,w2,... for --combine weighted")
    b.add_argument("--weighted-space", choices=["logits", "probs"], default=SUPPRESS,
                   help=f"(default {_default('merge', 'space')})")
    b.add_argument("--router", action="store_true", help="train a per-token gate on mixed data")
    b.add_argument("--finetune-head", action="store_true", help="tune only the output layer after merging")
    b.add_argument("--data", nargs="+", metavar="FILE", help="training text for --router/--finetune-head")
    b.add_argument("--tokens", type=int, default=SUPPRESS, help=f"(default {_default('merge', 'tokens')})")
    b.add_argument("--lr", type=float, default=SUPPRESS, help=f"(default {_default('merge', 'lr')})")
    b.set_defaults(func=cmd_merge)

    b = sub.add_parser("verify", help="recompute checksums and prove frozen blocks stayed frozen")
    b.add_argument("path", metavar="RUN_OR_MODEL")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_verify)

    dt = sub.add_parser("data", help="prepare training data ahead, at scale").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND")
    b = dt.add_parser("prepare", help="tokenize text into a prepared DATA folder (datatrove: local, Slurm or Ray)")
    b.add_argument("sources", nargs="+", metavar="SOURCES",
                   help="files, folders or globs of text, JSONL, parquet and save_to_disk datasets")
    b.add_argument("--tokenizer", required=True, metavar="TOK", help="a growlm tokenizer dir (the plan's)")
    b.add_argument("--out", required=True, metavar="DATA")
    b.add_argument("--workers", type=int, metavar="N",
                   help="tasks at once (local: default one per CPU core; slurm and ray: default no limit)")
    b.add_argument("--executor", choices=["local", "slurm", "ray"], default="local")
    b.add_argument("--shuffle", action="store_true", help="shuffle the documents within each task's shard")
    b.add_argument("--valid-fraction", type=float, default=0.0, metavar="F",
                   help="hold out this fraction of the documents (a text file's lines) as DATA's valid split")
    b.add_argument("--partition", help="--executor slurm: the partition to submit to")
    b.add_argument("--time", help="--executor slurm: each task's time limit (default 24:00:00)")
    b.set_defaults(func=cmd_data_prepare)

    b = sub.add_parser("demo", help="grow, compare and merge real models end to end, with a report")
    b.add_argument("--out", metavar="DIR", help="default demo-out (demo-out-growth with --study growth)")
    b.add_argument("--study", choices=["growth"],
                   help="growth: instead of the demo, which growth schedule reaches the monolithic model's loss "
                        "with the least training compute (about 4 minutes on two idle CPU cores; --quick: seconds)")
    b.add_argument("--tune", action="store_true",
                   help="with --study growth: rerun the tuning instead (every share and option of every schedule "
                        "once, at a seed the study does not use; default --out demo-out-growth-tuning)")
    b.add_argument("--quick", action="store_true", help="toy scale, about a minute")
    b.add_argument("--force", action="store_true", help="replace an existing report in --out")
    b.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="seeds of the headline comparison, grown vs monolithic (default 2), or of the study (3)")
    b.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        # parsing reads the registries (a bad choice lists them), which is when plugins are imported
        args = build_parser().parse_args(argv)
        args.func(args)
    except GrowlmError as e:
        print(f"growlm: error: {one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("growlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # last resort: a file problem no command anticipated is still the user's, in one line
        where = f": {e.filename}" if e.filename is not None else ""
        print(f"growlm: error: {one_line(e.strerror or str(e))}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
