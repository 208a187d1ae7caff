"""lm-evaluation-harness on growlm's own dirs: ``--model growlm --model_args path=DIR``.

A model dir or run stage is scored exactly as its Hugging Face export is by ``--model hf`` (same
tokens, same truncation, same prefix token); a mixture dir, which has no export, is scored with its
combine rule, through the mixture's own forward.

lm-eval 0.4.13 discovers no models from other packages (no entry points, no plugins): its registry
only knows what has been imported. So the CLI runs through this module, which registers ``growlm``
and then hands the command line to lm-eval's own ``cli_evaluate``::

    python -m growlm.lm_eval_model --model growlm --model_args path=DIR --tasks TASK --batch_size 8

Every other lm-eval flag and model (``--model hf`` too) works unchanged through it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from growlm.errors import GrowlmError, one_line
from growlm.evaluation import load_any

# (context text, continuation text), context tokens, continuation tokens: what TemplateLM hands over
Request = tuple[tuple[str | None, str | None], list[int], list[int]]


def _batch_size(value: int | str | None) -> int:
    """``--batch_size`` as a number (``auto`` has nothing to probe on a growlm model: it means 1)."""
    if value is None or str(value).startswith("auto"):
        return 1
    try:
        size = int(value)
    except ValueError:
        raise GrowlmError(f"--batch_size takes a positive number, got {value!r}") from None
    if size < 1:
        raise GrowlmError(f"--batch_size takes a positive number, got {value!r}")
    return size


@register_model("growlm")
class GrowlmLM(TemplateLM):
    """A growlm model dir, run stage or mixture dir as an lm-eval model (all three output types)."""

    def __init__(self, path: str, batch_size: int | str | None = 1, device: str | None = None,
                 max_gen_toks: int | str = 256, max_batch_size: int | None = None, **unknown: object) -> None:
        super().__init__()
        # a misspelt --model_args key must not pass silently (max_batch_size only matters for `auto`)
        if unknown:
            raise GrowlmError(f"--model growlm takes path, max_gen_toks in --model_args; unknown: {', '.join(unknown)}")
        self.model, self.tokenizer = load_any(Path(path))
        # lm-eval's CLI asks for cuda by default; like `--model hf`, a machine without one uses the CPU
        if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.model.to(self._device)
        self.batch_size = _batch_size(batch_size)
        self.max_length: int = self.model.cfg.context
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # what `--model hf` uses on the export (its tokenizer has a BOS), so both score the same tokens
        return self.tokenizer.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: object) -> list[int]:
        """Token ids of ``string``; growlm's tokenizer adds no special tokens, like its export."""
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs: object) -> str:
        """The text of ``tokens``."""
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """Next-token log-probabilities ``[B, T, V]`` of right-padded ``rows``: causal attention
        means the padding never reaches a real position, and callers read real positions only."""
        width = max(len(r) for r in rows)
        idx = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            idx[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return F.log_softmax(self.model(idx.to(self._device)).float(), dim=-1)

    def _batches(self, order: list[int]) -> Iterator[list[int]]:
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: object) -> list[tuple[float, bool]]:
        """Summed log-probability of each continuation and whether it is the greedy one."""
        # the window the export scores under `--model hf`: the last max_length tokens before each target
        rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in requests]
        # longest first, so each batch pads little (and an out-of-memory shows up at once)
        order = sorted(range(len(requests)), key=lambda i: -len(rows[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for batch in self._batches(order):
            logp = self._log_probs([rows[i] for i in batch])
            for b, i in enumerate(batch):
                cont = requests[i][2]
                n = len(rows[i])
                span = logp[b, n - len(cont):n]
                target = torch.tensor(cont, dtype=torch.long, device=span.device)
                greedy = bool((span.argmax(dim=-1) == target).all())
                results[i] = (float(span.gather(-1, target[:, None]).sum()), greedy)
                if requests[i][0][0] is not None:  # rolling windows are cached whole, by the caller
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of the model's context (as `--model hf`)."""
        windows: list[Request] = []
        owner: list[int] = []
        for n, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((None, None), ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[n] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string (``until``) or the end-of-text token."""
        prompts: list[tuple[list[int], list[str], int]] = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if kw.get("do_sample") or kw.get("temperature", 0.0):
                raise GrowlmError("--model growlm generates greedily; drop do_sample/temperature from gen_kwargs")
            new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            # positions stay within the trained context: the prompt keeps at least half of it
            new = max(1, min(new, self.max_length // 2))
            prompts.append((self.tok_encode(context)[-(self.max_length - new):], until, new))
        out = [""] * len(requests)
        # one batch = prompts of one length and budget, so no padding enters a generation
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (ids, _, new) in enumerate(prompts):
            groups.setdefault((len(ids), new), []).append(i)
        for (_, new), members in groups.items():
            for batch in self._batches(members):
                idx = torch.tensor([prompts[i][0] for i in batch], dtype=torch.long, device=self._device)
                gen = self.model.generate(idx, new, eos_id=self.eot_token_id)[:, idx.shape[1]:].tolist()
                for i, tokens in zip(batch, gen, strict=True):
                    if self.eot_token_id in tokens:
                        tokens = tokens[:tokens.index(self.eot_token_id)]
                    text = self.tok_decode(tokens)
                    for stop in prompts[i][1]:
                        if stop:
                            text = text.split(stop, 1)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's own command line, with ``--model growlm`` registered."""
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models beside growlm)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except GrowlmError as e:
        print(f"growlm: error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
