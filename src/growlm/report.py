"""Tables and PNG plots: the evidence a run, a sweep or the demo leaves behind."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from growlm.files import WriteError, atomic_write_bytes  # noqa: E402


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; floats get 4 significant decimals, ints thousands separators."""

    def fmt(v: object) -> str:
        if isinstance(v, bool) or v is None:
            return "" if v is None else str(v)
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_loss_curves(runs: dict[str, list[dict]], out: Path, title: str = "training loss across stages") -> Path:
    """Training loss against cumulative tokens, one line per run, dotted verticals at stage starts.

    The spike right after each dotted line is the growth spike: a new random block on top. Raw
    logged losses are drawn faintly, their moving average boldly.
    """
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, recs in runs.items():
        xs, ys, offset, last_stage, last_tok, bounds = [], [], 0, None, 0, []
        for r in recs:
            if r["stage"] != last_stage:
                offset += last_tok
                if last_stage is not None:
                    bounds.append(offset)
                last_stage = r["stage"]
            last_tok = r["tokens"]
            xs.append(offset + r["tokens"])
            ys.append(r["loss"])
        (line,) = ax.plot(xs, ys, lw=0.6, alpha=0.3)
        ax.plot(xs, ema(ys), label=name, lw=1.5, color=line.get_color())
        for b in bounds:
            ax.axvline(b, color=line.get_color(), ls=":", lw=0.8)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def ema(values: Sequence[float], alpha: float = 0.3) -> list[float]:
    """Exponential moving average (what the eye needs to see a trend through batch-to-batch noise)."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out


def plot_vs_depth(series: dict[str, list[tuple[int, float]]], ylabel: str, out: Path, title: str) -> Path:
    """A metric against model depth, one line per series (the paper's emergence-with-depth figure)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("depth (blocks)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_curves(series: dict[str, list[tuple[float, float]]], out: Path, *, xlabel: str, ylabel: str, title: str,
                mark: float | None = None, mark_label: str | None = None, level: float | None = None,
                level_label: str | None = None) -> Path:
    """One line per series of (x, y) points, with a dashed vertical at ``mark`` (e.g. a budget) and a dotted
    horizontal at ``level`` (e.g. a loss to reach), each named in the legend by its label."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", ms=3, lw=1.2, label=name)
    if mark is not None:
        ax.axvline(mark, color="0.3", ls="--", lw=0.9, label=mark_label)
    if level is not None:
        ax.axhline(level, color="0.3", ls=":", lw=0.9, label=level_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    """Write ``fig`` as a PNG all or nothing (a failed write raises WriteError naming ``out``)."""
    out = Path(out)
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    _mkdir(out.parent)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _mkdir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(d, str(e.strerror or e)) from e


def sweep_report(results: list[dict], out_dir: Path, task: str) -> tuple[Path, Path]:
    """Table (Markdown) and plot (PNG) of a per-stage evaluation sweep; returns both paths."""
    metric = next(k for k in ("accuracy", "bleu", "exact_match", "bits_per_byte", "loss") if k in results[0])
    rows = [(r["stage"], r.get("n_layers"), r.get(metric), r.get("ci95")) for r in results]
    table = markdown_table(["stage", "depth", metric, "ci95"], rows)
    out_dir = Path(out_dir)
    _mkdir(out_dir)
    md = out_dir / f"sweep-{task}.md"
    atomic_write_bytes(md, f"# {task}: {metric} per stage\n\n{table}\n".encode())
    png = plot_vs_depth({task: [(r.get("n_layers") or r["stage"], r[metric]) for r in results]}, metric,
                        out_dir / f"sweep-{task}.png", f"{task}: {metric} vs depth")
    return md, png
