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
from pathlib import Path

from growlm.errors import GrowlmError, one_line


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


# ----------------------------------------------------------------------------------------------
# commands


def cmd_tokenizer_build(a: argparse.Namespace) -> None:
    from growlm.tokenizer import build_preset, build_tokenizer

    if a.preset:
        if not a.ngram_list:
            raise GrowlmError("--preset needs --ngram-list FILE (the published n-gram list)")
        tok = build_preset(a.preset, Path(a.ngram_list))
    else:
        if not a.corpus:
            raise GrowlmError("give --corpus FILE... or --preset NAME --ngram-list FILE")
        ngrams = tuple(int(n) for n in a.ngrams.split(",")) if a.ngrams else (2, 3)
        tok = build_tokenizer([Path(c) for c in a.corpus], compact=a.compact, ngrams=ngrams, top_k=a.top_k)
    tok.save(Path(a.out))
    print(f"tokenizer: {tok.vocab_size:,} tokens, fingerprint {tok.fingerprint} -> {a.out}")


def cmd_substrate_build(a: argparse.Namespace) -> None:
    from growlm.substrate import build_substrate

    tok = None
    if a.tokenizer:
        from growlm.tokenizer import Tokenizer

        tok = Tokenizer.load(Path(a.tokenizer))
    elif a.vocab_size is None:
        raise GrowlmError("give --tokenizer DIR or --vocab-size N")
    sub = build_substrate(a.kind, dim=a.dim, tokenizer=tok, vocab_size=a.vocab_size, bits=a.bits, seed=a.seed)
    sub.save(Path(a.out))
    print(f"substrate {sub.kind}: [{sub.vocab_size:,}, {sub.dim}], fingerprint {sub.fingerprint} -> {a.out}")


def cmd_info(a: argparse.Namespace) -> None:
    from growlm.info import info_model, info_preset

    info = info_preset(a.preset) if a.preset else info_model(Path(a.model)) if a.model else None
    if info is None:
        raise GrowlmError("give MODEL_DIR or --preset NAME")
    if a.json:
        _print_json(info)
    else:
        for k, v in info.items():
            if k not in ("blocks", "lineage", "experts"):
                print(f"{k:24s} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:24s} {v}")


def cmd_train(a: argparse.Namespace) -> None:
    if a.nproc and a.nproc > 1:
        from growlm.distributed import launch

        raise SystemExit(launch(a.plan, a.out, a.nproc, resume=a.resume))
    from growlm.distributed import world
    from growlm.train import train

    dirs = train(Path(a.plan), Path(a.out), resume=a.resume, progress=not a.no_progress)
    if world()[0] == 0:  # under torchrun, one line, not one per rank
        print(f"done: {len(dirs)} stages in {a.out}")


def cmd_lora_merge(a: argparse.Namespace) -> None:
    from growlm.checkpoint import load_model, save_model
    from growlm.lora import merge_adapters

    saved = load_model(Path(a.model))
    if not saved.model.lora_records:
        raise GrowlmError(f"{a.model} has no LoRA adapters to merge")
    model = merge_adapters(saved.model)
    keep = {k: saved.meta[k] for k in ("plan", "stage", "metrics", "params_active") if k in saved.meta}
    keep["merged_from"] = saved.meta["fingerprint"]
    meta = save_model(model, Path(a.out), tokenizer_dir=saved.tokenizer_dir, substrate=saved.meta["substrate"],
                      extra=keep, lineage=saved.meta["lineage"] + [saved.meta["fingerprint"]])
    print(f"merged {len(saved.meta['lora'])} LoRA stage(s) into {a.out} (fingerprint {meta['fingerprint'][:12]})")


def cmd_generate(a: argparse.Namespace) -> None:
    import torch

    from growlm.evaluate import load_any

    lm, tok = load_any(Path(a.model))
    ids = tok.encode(a.prompt)
    if not ids:
        raise GrowlmError("the prompt encodes to no tokens")
    gen = torch.Generator().manual_seed(a.seed)
    out = lm.generate(torch.tensor([ids]), a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                      generator=gen)
    print(a.prompt + tok.decode(out[0, len(ids):].tolist()))


def cmd_eval(a: argparse.Namespace) -> None:
    from growlm.evaluate.run import evaluate, evaluate_per_stage

    kwargs = dict(data=a.data, protocol=a.protocol, limit=a.limit, runs=a.runs, seed=a.seed, sample=a.sample)
    if a.per_stage:
        results = evaluate_per_stage(Path(a.model), a.task, **kwargs)
    else:
        results = [evaluate(Path(a.model), a.task, **kwargs)]
    for r in results:
        if a.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print("  ".join(f"{k}={v}" for k, v in r.items() if not isinstance(v, dict | list)))
    if a.per_stage:
        from growlm.report import sweep_report

        md, png = sweep_report(results, Path(a.model) / "eval", a.task)
        print(f"depth sweep: {md} and {png}", file=sys.stderr)


def cmd_export(a: argparse.Namespace) -> None:
    from growlm.interop import export_hf

    out = export_hf(Path(a.model), Path(a.out))
    print(f"exported {a.model} -> {out} (GPTNeoXForCausalLM; load with transformers.AutoModelForCausalLM)")


def cmd_import(a: argparse.Namespace) -> None:
    from growlm.interop import import_hf

    out = import_hf(Path(a.hf_dir), Path(a.out))
    print(f"imported {a.hf_dir} -> {out}")


def cmd_merge(a: argparse.Namespace) -> None:
    from growlm.compose import merge_cli

    merge_cli(a)


def cmd_verify(a: argparse.Namespace) -> None:
    from growlm.verify import verify

    report = verify(Path(a.path))
    if a.json:
        _print_json(report)
    else:
        for line in report["lines"]:
            print(line)
    if not report["ok"]:
        raise GrowlmError(f"verification failed for {a.path}: {report['problems'][0]}")


def cmd_demo(a: argparse.Namespace) -> None:
    from growlm.demo import demo

    demo(out=Path(a.out), quick=a.quick, force=a.force)


# ----------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="growlm", description="Grow language models layer by layer over a frozen substrate.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tk = sub.add_parser("tokenizer", help="build a bvv241-style Unicode tokenizer").add_subparsers(dest="sub", required=True)
    b = tk.add_parser("build", help="build a tokenizer from a corpus or a preset")
    b.add_argument("--corpus", nargs="+", metavar="FILE")
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--compact", action="store_true", help="small vocabulary: code points seen + specials + n-grams")
    b.add_argument("--ngrams", default="2,3", help="n-gram lengths to mine, e.g. 2,3")
    b.add_argument("--top-k", type=int, default=338, help="n-grams kept per corpus file and length")
    b.add_argument("--preset", help="bvv241-2-3: the paper's exact vocabulary")
    b.add_argument("--ngram-list", metavar="FILE", help="the published n-gram list for --preset")
    b.set_defaults(func=cmd_tokenizer_build)

    sb = sub.add_parser("substrate", help="build a frozen token substrate").add_subparsers(dest="sub", required=True)
    b = sb.add_parser("build", help="build a substrate matrix and its recipe")
    b.add_argument("--kind", required=True, help="glyph | binary | random-bits | trainable")
    b.add_argument("--tokenizer", metavar="DIR")
    b.add_argument("--vocab-size", type=int)
    b.add_argument("--dim", type=int, required=True)
    b.add_argument("--bits", type=int, help="code width for binary/random-bits")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, metavar="DIR")
    b.set_defaults(func=cmd_substrate_build)

    b = sub.add_parser("info", help="describe a model dir, run stage, mixture or preset")
    b.add_argument("model", nargs="?", metavar="MODEL")
    b.add_argument("--preset")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_info)

    b = sub.add_parser("train", help="run a growth plan")
    b.add_argument("plan", metavar="PLAN.toml")
    b.add_argument("--out", required=True, metavar="RUN")
    b.add_argument("--resume", action="store_true", help="continue a stopped run")
    b.add_argument("--nproc", type=int, default=0, help="launch N data-parallel processes with torchrun")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_train)

    b = sub.add_parser("lora-merge", help="fold LoRA adapters into the base weights")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("--out", required=True, metavar="DIR")
    b.set_defaults(func=cmd_lora_merge)

    b = sub.add_parser("generate", help="generate text (KV-cached; greedy unless --temperature)")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("--prompt", required=True)
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--top-k", type=int)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_generate)

    b = sub.add_parser("eval", help="perplexity and benchmarks")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("--task", required=True)
    b.add_argument("--data", nargs="+", metavar="PATH")
    b.add_argument("--protocol", choices=["paper", "loglik"], default="paper")
    b.add_argument("--limit", type=int)
    b.add_argument("--runs", type=int)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--sample", action="store_true", help="stochastic decoding, as the paper's runs")
    b.add_argument("--per-stage", action="store_true", help="evaluate every stage of a run (depth sweep)")
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
    b.add_argument("--combine", choices=["mean-logits", "mean-probs", "weighted"], default="mean-logits")
    b.add_argument("--weights", help="w1,w2,... for --combine weighted")
    b.add_argument("--weighted-space", choices=["logits", "probs"], default="logits")
    b.add_argument("--router", action="store_true", help="train a per-token gate on mixed data")
    b.add_argument("--finetune-head", action="store_true", help="tune only the output layer after merging")
    b.add_argument("--data", nargs="+", metavar="FILE", help="training text for --router/--finetune-head")
    b.add_argument("--tokens", type=int, default=32768)
    b.add_argument("--lr", type=float, default=1e-3)
    b.set_defaults(func=cmd_merge)

    b = sub.add_parser("verify", help="recompute checksums and prove frozen blocks stayed frozen")
    b.add_argument("path", metavar="RUN_OR_MODEL")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_verify)

    b = sub.add_parser("demo", help="grow, compare and merge real models end to end, with a report")
    b.add_argument("--out", default="demo-out", metavar="DIR")
    b.add_argument("--quick", action="store_true", help="toy scale, about a minute")
    b.add_argument("--force", action="store_true", help="replace an existing report in --out")
    b.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GrowlmError as e:
        print(f"growlm: error: {one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("growlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
