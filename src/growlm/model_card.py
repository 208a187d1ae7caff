"""Model cards and saved evaluation results.

``growlm eval MODEL ... --save`` appends its result to the sidecar ``MODEL/evals.jsonl``::

    MODEL/evals.jsonl   one JSON object per line, append-only: the dict ``growlm eval --json`` prints
                        (task, model_fingerprint, protocol, scores, ...) plus ``data`` (the --data
                        arguments as given, or null) and ``saved_at`` (UTC, ISO 8601)

The stage files (model.json, the weights, tokenizer/) stay immutable: the sidecar is recorded in
none of their checksums, so ``growlm verify`` and loading ignore it, and a result is attributed by
the fingerprint it carries, never by where the file lies (a line whose fingerprint is not the dir's
is left out of the card). A mixture dir keeps its own ``evals.jsonl``; a run's ``--per-stage``
results go to each ``RUN/stage-N/evals.jsonl``.

``growlm export --to hf`` writes ``README.md``: Hugging Face's YAML front matter (``library_name:
transformers``, ``tags``, ``pipeline_tag``, and ``model-index`` when results were saved) and a body
with the architecture, the docking port (substrate recipe and fingerprint, tokenizer fingerprint),
the lineage of stages and the saved results. Stage names, data file names and whatever a hand edit
left in ``evals.jsonl`` reach the card as one line of plain text: escaped for markdown and HTML in the
body, single-line strings in the front matter.
"""

from __future__ import annotations

import html
import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from growlm.errors import GrowlmError, one_line
from growlm.files import WriteError
from growlm.store import stages
from growlm.store.model import read_meta
from growlm.store.records import ModelRecord

EVALS = "evals.jsonl"
CARD = "README.md"
# result keys that describe the run, not a score (kept out of the card's metric lists)
_BOOKKEEPING = {"task", "model", "model_fingerprint", "protocol", "n", "runs", "seed", "sample", "limit", "data",
                "saved_at", "stage", "n_layers", "n_tokens", "n_bytes", "n_chars", "unk_rate", "invalid_rate", "context", "stride"}


# ----------------------------------------------------------------------------------------------
# The evals.jsonl sidecar


def save_eval(model_dir: str | Path, result: dict, data: list[str] | None = None) -> Path:
    """Append ``result`` (an :func:`growlm.api.evaluate` dict) to ``model_dir/evals.jsonl``; returns the file.

    One line, all or nothing: a write that fails (a full disk) is cut back to the line before, so
    the file never holds a torn record.
    """
    path = Path(model_dir) / EVALS
    if path.is_symlink():  # the model dir must hold regular files only (files.check_tree)
        raise GrowlmError(f"{path} is a symlink; the saved results must be a regular file in the model dir")
    rec = {**result, "data": data, "saved_at": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:  # a --data path of bytes that are no UTF-8 (surrogate escapes): \u escapes
        line = (json.dumps(rec) + "\n").encode()
    try:
        with open(path, "a+b") as fh:
            size = fh.seek(0, 2)
            if size:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":  # a torn last line (a kill mid-append): never glue a record onto it
                    line = b"\n" + line
            try:
                fh.write(line)
                fh.flush()
            except OSError:
                fh.truncate(size)
                raise
    except OSError as e:
        raise WriteError(path, str(e.strerror or e)) from e
    return path


# str.splitlines' line breaks but U+0085, U+2028 and U+2029, which json.dumps(ensure_ascii=False) leaves
# raw inside a string (a data file's name, say): splitting there cut a record in two
_LINE_BREAK = re.compile(r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e]")


def read_evals(model_dir: str | Path, fingerprint: str | None = None) -> list[dict]:
    """The results saved in ``model_dir/evals.jsonl`` (none when it is absent), oldest first.

    ``fingerprint``: keep only results of that model (a copied sidecar cannot lend its scores to
    another model). A line that is not a JSON object (a hand edit) is skipped, not fatal: the
    results are a record beside the model, and the model is fine without them; so is a record without
    a task name (a string), which the card could not name.
    """
    path = Path(model_dir) / EVALS
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise GrowlmError(one_line(f"cannot read {path}: {e.strerror or e}")) from None
    out = []
    for ln in _LINE_BREAK.split(text):
        try:
            rec = json.loads(ln)
        except (ValueError, RecursionError):  # RecursionError: a line of thousands of nested brackets
            continue
        if (isinstance(rec, dict) and isinstance(rec.get("task"), str)
                and (fingerprint is None or rec.get("model_fingerprint") == fingerprint)):
            out.append(rec)
    return out


def scores(result: dict) -> dict[str, float]:
    """The finite scores of a result, headline first (``ppl`` for perplexity, else the first metric)."""
    nums = {k: f for k, v in result.items()
            if k not in _BOOKKEEPING and isinstance(v, int | float) and not isinstance(v, bool)
            and not k.startswith(("ci95", "std", "run_scores")) and math.isfinite(f := _float(v))}
    if "ppl" in nums:
        return {"ppl": nums.pop("ppl"), **nums}
    return nums


def _float(v: int | float) -> float:
    """``v`` as a float; an int too large for one (a hand-edited sidecar) is infinite, so no score."""
    try:
        return float(v)
    except OverflowError:
        return math.inf


# ----------------------------------------------------------------------------------------------
# The card

# characters that start markdown inline syntax (emphasis, code, links, images, strikethrough, headings'
# closing #s) or end a table cell: escaped with a backslash, so a name shows as the text it is
_MARKDOWN = re.compile(r"([\\`*_\[\]|~#])")


def _plain(value: object) -> str:
    """``value`` on one line of printable characters (a name may hold newlines or control characters)."""
    return one_line("".join(ch if ch.isprintable() else " " for ch in str(value)))


def _md(value: object) -> str:
    """``value`` as inert text in a markdown heading or table cell: one line, no markup, no HTML.

    Stage names, data file names and everything read from ``evals.jsonl`` are the user's (or a hand
    edit's) and travel to a hub that renders the card: a ``|`` must not split a row, a newline must
    not start a block, and ``<script>`` or ``<img onerror=...>`` must show as text.
    """
    return html.escape(_MARKDOWN.sub(r"\\\1", _plain(value)), quote=False)


def _code(value: object) -> str:
    """``value`` as a markdown code span: fenced by more backticks than it holds in a row, so none can
    close it early (inside a code span nothing else is markup, HTML included)."""
    text = _plain(value)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _data_names(result: dict) -> str:
    """The evaluated files by name only: the card travels to a hub, the user's local paths need not."""
    data = result.get("data")
    return ", ".join(Path(str(d)).name for d in data) if isinstance(data, list) else ""


def front_matter(meta: ModelRecord, name: str, evals: list[dict]) -> dict:
    """Hugging Face's card metadata for the export of the model whose model.json is ``meta``.

    No ``license``: neither a plan nor model.json records one, and a guessed licence would be worse
    than none.
    """
    fm: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["growlm", "gpt_neox", "text-generation", f"substrate-{meta.substrate.kind}"],
    }
    results = []
    for r in evals:
        metrics = [{"type": "perplexity" if k == "ppl" else _plain(k), "name": _plain(k), "value": v}
                   for k, v in scores(r).items()]
        if not metrics:
            continue
        task = _plain(r["task"])
        data = _plain(_data_names(r)) or task
        results.append({"task": {"type": "text-generation", "name": f"{task} ({_plain(r.get('protocol', ''))})"},
                        "dataset": {"name": data, "type": task}, "metrics": metrics})
    if results:
        fm["model-index"] = [{"name": _plain(name), "results": results}]
    return fm


def _lineage_rows(model_dir: Path, meta: ModelRecord) -> list[tuple[str, str, str, str, str]]:
    """(stage, layers, params active, tokens, fingerprint) for each ancestor and the model itself.

    A stage's model.json names its ancestors by fingerprint only; when the model is a run's stage,
    the sibling ``stage-N`` dirs holding those fingerprints supply their counts.
    """
    known: dict[str, ModelRecord] = {}
    for _, sdir in stages(model_dir.parent):
        try:
            m = read_meta(sdir)
        except GrowlmError:  # a damaged sibling only costs the card its counts
            continue
        known[m.fingerprint] = m

    def row(m: ModelRecord | None, fp: str) -> tuple[str, str, str, str, str]:
        if m is None:
            return ("?", "?", "?", "?", fp[:12])
        st = m.stage
        label = "-" if st is None else f"{st.index} ({st.name})" if st.name else str(st.index)
        active = m.params_active if m.params_active is not None else m.params_trainable
        tokens = f"{m.metrics.tokens:,}" if m.metrics is not None else "-"
        return (label, str(m.config["n_layers"]), f"{active:,}", tokens, fp[:12])

    return [row(known.get(fp), fp) for fp in meta.lineage] + [row(meta, meta.fingerprint)]


def _table(head: tuple[str, ...], rows: list[tuple]) -> list[str]:
    """A markdown table; every cell is escaped (:func:`_md`), so each row keeps exactly its columns."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(_md, r)) + " |"
                                                                        for r in rows]


def card_text(model_dir: str | Path, meta: ModelRecord) -> str:
    """The full ``README.md`` of the export of ``model_dir`` (model.json ``meta``, already checked)."""
    model_dir = Path(model_dir)
    evals = read_evals(model_dir, meta.fingerprint)
    name = model_dir.name
    cfg, sub = meta.config, meta.substrate
    # no line folding: a long name stays one line, so no line of the front matter can read as its "---" end
    fm = yaml.safe_dump(front_matter(meta, name, evals), sort_keys=False, allow_unicode=True, width=math.inf)
    lines = [
        "---", fm.rstrip("\n"), "---", "",
        f"# {_md(name)}", "",
        "A causal language model grown layer by layer with growlm over a frozen token "
        "substrate, exported as a stock `GPTNeoXForCausalLM` (load it with "
        "`transformers.AutoModelForCausalLM.from_pretrained`, no `trust_remote_code`).", "",
        "## Architecture", "",
        *_table(("layers", "d_model", "heads", "context", "vocab", "substrate width", "params total",
                 "params trainable"),
                [(cfg["n_layers"], cfg["d_model"], cfg["n_heads"], cfg["context"], f"{cfg['vocab_size']:,}",
                  cfg.get("embed_dim") or cfg["d_model"], f"{meta.params_total:,}",
                  f"{meta.params_trainable:,}")]),
        "",
        "## Docking port", "",
        f"- model fingerprint: {_code(meta.fingerprint)}",
        f"- substrate: {_code(sub.kind)}, fingerprint {_code(meta.substrate_fingerprint)}",
        f"- substrate recipe: {_code(json.dumps(sub.recipe, sort_keys=True))}",
        f"- tokenizer fingerprint: {_code(meta.tokenizer_fingerprint)}",
    ]
    if meta.lora:
        lines.append(f"- LoRA adapters of {len(meta.lora)} stage(s), merged into the exported weights")
    lines += ["", "## Lineage", "",
              "Stages this model grew through, oldest first (the last row is this model); params active are "
              "those the stage trained, tokens those it trained on.", "",
              *_table(("stage", "layers", "params active", "tokens", "fingerprint"), _lineage_rows(model_dir, meta)),
              ""]
    lines += ["## Evaluation", ""]
    if evals:
        rows = [(r["task"], r.get("protocol", ""), _data_names(r) or "-", r.get("n", ""),
                 ", ".join(f"{k}={v:.4g}" for k, v in scores(r).items()), r.get("saved_at", ""))
                for r in evals]
        lines += ["Saved with `growlm eval ... --save` for this fingerprint:", "",
                  *_table(("task", "protocol", "data", "n", "scores", "saved"), rows), ""]
    else:
        lines += ["No evaluation results were saved with this model (`growlm eval MODEL ... --save` records them).",
                  ""]
    return "\n".join(lines)


def write_card(model_dir: str | Path, meta: dict, out_dir: str | Path) -> Path:
    """Write :func:`card_text` to ``out_dir/README.md``; returns it."""
    path = Path(out_dir) / CARD
    path.write_text(card_text(model_dir, meta), encoding="utf-8")
    return path


__all__ = ["CARD", "EVALS", "card_text", "front_matter", "read_evals", "save_eval", "scores", "write_card"]
