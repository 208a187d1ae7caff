"""lm-evaluation-harness on growlm's own dirs: ``--model growlm --model_args path=DIR``.

A model dir or run stage is scored exactly as its Hugging Face export is by ``--model hf`` (same
tokens, same truncation, same prefix token); a mixture dir, which has no export, is scored with its
combine rule, through the mixture's own forward. Where ``--model hf`` crashes (an empty generation
context, an all-space log-likelihood context), growlm conditions on the prefix token; a continuation
longer than the whole context, and a bad ``--model_args`` value, ``--device`` or ``gen_kwargs``, are
refused in one line (a :class:`~growlm.errors.GrowlmError`, which :func:`main` prints as
``growlm: error: ...`` with exit code 2).

lm-eval 0.4.13 discovers no models from other packages (no entry points, no plugins): its registry
only knows what has been imported. So the CLI runs through this module, which registers ``growlm``
and then hands the command line to lm-eval's own ``cli_evaluate``::

    python -m growlm.lm_eval_model --model growlm --model_args path=DIR --tasks TASK --batch_size 8

Every other lm-eval flag and model (``--model hf`` too) works unchanged through it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from growlm.errors import GrowlmError, one_line
from growlm.loading import load_any

# (context text, continuation text), context tokens, continuation tokens: what TemplateLM hands over
Request = tuple[tuple[str | None, str | None], list[int], list[int]]


def _shown(value: object) -> str:
    """``value`` as an error message quotes it: its repr, on one line and cut short (it may be huge)."""
    text = one_line(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _positive_int(name: str, value: object) -> int:
    """``value`` (as lm-eval parsed it from the command line or a task's yaml) as a whole number >= 1,
    or a one-line error naming ``name``."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):  # lm-eval turns `true` into True
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):  # not a number: refused below
            number = int(value.strip())
    if number is None or number < 1:
        raise GrowlmError(f"{name} takes a positive whole number, got {_shown(value)}")
    return number


def _batch_size(value: object) -> int:
    """``--batch_size`` as a number (``auto`` has nothing to probe on a growlm model: it means 1)."""
    if value is None or str(value).startswith("auto"):
        return 1
    return _positive_int("--batch_size", value)


def _model_path(value: object) -> Path:
    """``path=`` of ``--model_args``, which lm-eval may have parsed into a number."""
    if value is None or value == "":
        raise GrowlmError("--model growlm needs the model in --model_args: path=DIR (a model dir, run stage or "
                          "mixture dir)")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise GrowlmError(f"--model_args path takes a dir, got {_shown(value)}")
    return Path(str(value))


def _device(value: object) -> torch.device:
    """``--device`` (or ``device=`` in ``--model_args``) as a device growlm can run on here."""
    if value is None or value == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(value))
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise GrowlmError(f"--device {_shown(value)} is no device growlm runs on: use cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        # lm-eval's CLI asks for cuda by default; like `--model hf`, a machine without one uses the CPU
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GrowlmError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GrowlmError("--device mps: this machine has no MPS device; use cpu")
    return device


def _where(req: object, n: int) -> str:
    """Which request a message is about: its task and doc when lm-eval made it, else its place in the list."""
    task, doc = getattr(req, "task_name", None), getattr(req, "doc_id", None)
    return f"task {task}, doc {doc}" if task is not None else f"request {n}"


@register_model("growlm")
class GrowlmLM(TemplateLM):
    """A growlm model dir, run stage or mixture dir as an lm-eval model (all three output types)."""

    def __init__(self, path: object = None, batch_size: object = 1, device: object = None,
                 max_gen_toks: object = 256, max_batch_size: object = None, **unknown: object) -> None:
        super().__init__()
        # a misspelt --model_args key must not pass silently (max_batch_size only matters for `auto`)
        if unknown:
            # a key of a JSON --model_args may be empty or hold a newline: quoted then, so it stays one line
            keys = ", ".join(k if k.isidentifier() else _shown(k) for k in unknown)
            raise GrowlmError(f"--model growlm takes path, max_gen_toks in --model_args; unknown: {keys}")
        # every argument is checked before the model loads: a typo costs no loading time
        model_path = _model_path(path)
        self._device = _device(device)
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = _positive_int("--model_args max_gen_toks", max_gen_toks)
        try:
            self.model, self.tokenizer = load_any(model_path)
        except OSError as e:  # a path the OS cannot even look up (a name too long, say)
            raise GrowlmError(one_line(f"cannot read {model_path}: {e.strerror or e}")) from None
        self.model.to(self._device)
        self.max_length: int = self.model.cfg.context

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> GrowlmLM:
        """The model of ``--model_args`` (a dict) and lm-eval's own flags (``--device``, ``--batch_size``).

        lm-eval's CLI always passes those flags, its defaults (``cuda:0``, 1) included, and its base class
        calls ``cls(**arg_dict, **additional_config)``: ``device=`` or ``batch_size=`` in ``--model_args``
        was a TypeError traceback. Here the key the user wrote in ``--model_args`` wins.
        """
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**(extra | dict(arg_dict)))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> GrowlmLM:
        """As :meth:`create_from_arg_obj`, from ``key=value,...`` (how ``simple_evaluate`` takes a string)."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

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

    def _context_tokens(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens, as TemplateLM.loglikelihood encodes them, also where it
        would crash: an empty or all-space context (lm-eval moves the spaces to the continuation) is
        conditioned on the prefix token, as lm-eval does for an empty one."""
        ctx, cont = self._encode_pair(context, continuation) if context else ([], self.tok_encode(continuation))
        if not ctx:
            ctx, cont = (cont[:1], cont[1:]) if cont and cont[0] == self.prefix_token_id else ([self.prefix_token_id], cont)
        return ctx, cont

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Summed log-probability of each ``(context, continuation)`` and whether it is the greedy one.

        Scored as ``--model hf`` scores the export: a context too long for the window loses its left
        end. A continuation longer than the whole window cannot be scored under one context (``--model
        hf`` stops on an assertion there): it is refused in one line, before any request is scored.
        """
        encoded: list[Request] = []
        for n, req in enumerate(requests):
            args = getattr(req, "args", None)
            if not (isinstance(args, tuple) and len(args) == 2 and all(isinstance(a, str) for a in args)):
                raise GrowlmError(f"{_where(req, n)}: a loglikelihood request takes (context, continuation) "
                                  f"strings, got {_shown(args)}")
            ctx, cont = self._context_tokens(*args)
            if len(cont) > self.max_length:
                raise GrowlmError(f"{_where(req, n)}: the continuation is {len(cont)} tokens, more than the "
                                  f"model's context of {self.max_length}, so it cannot be scored in one window")
            encoded.append((args, ctx, cont))
        return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: object) -> list[tuple[float, bool]]:
        """Summed log-probability of each continuation and whether it is the greedy one."""
        # an empty continuation (its text merged into the context's last token) is certain: nothing to run
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        # the window the export scores under `--model hf`: the last max_length tokens before each target
        rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in requests]
        # longest first, so each batch pads little (and an out-of-memory shows up at once)
        order = sorted((i for i, r in enumerate(requests) if r[2]), key=lambda i: -len(rows[i]))
        for batch in self._batches(order):
            logp = self._log_probs([rows[i] for i in batch])
            for b, i in enumerate(batch):
                cont = requests[i][2]
                n = len(rows[i])
                span = logp[b, n - len(cont):n]
                target = torch.tensor(cont, dtype=torch.long, device=span.device)
                greedy = bool((span.argmax(dim=-1) == target).all())
                results[i] = (float(span.gather(-1, target[:, None]).sum()), greedy)
        for i, req in enumerate(requests):
            if req[0][0] is not None:  # rolling windows are cached whole, by the caller
                self.cache_hook.add_partial("loglikelihood", req[0], results[i])
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of the model's context (as `--model hf`)."""
        windows: list[Request] = []
        owner: list[int] = []
        for n, req in enumerate(requests):
            args = getattr(req, "args", None)
            if not (isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], str)):
                raise GrowlmError(f"{_where(req, n)}: a loglikelihood_rolling request takes (text,), got {_shown(args)}")
            (text,) = args
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
        for n, req in enumerate(requests):
            args = getattr(req, "args", None)
            if not (isinstance(args, tuple) and len(args) == 2 and isinstance(args[0], str)
                    and isinstance(args[1], dict)):
                raise GrowlmError(f"{_where(req, n)}: a generate_until request takes (context, gen_kwargs dict), "
                                  f"got {_shown(args)}")
            context, kw = args[0], dict(args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else until
            if not isinstance(until, list | tuple) or not all(isinstance(u, str) for u in until):
                raise GrowlmError(f"{_where(req, n)}: gen_kwargs until takes a string or a list of strings, "
                                  f"got {_shown(until)}")
            if kw.get("do_sample") or kw.get("temperature", 0.0):
                raise GrowlmError("--model growlm generates greedily; drop do_sample/temperature from gen_kwargs")
            new = kw.pop("max_gen_toks", None)
            new = self.max_gen_toks if new is None else _positive_int(f"{_where(req, n)}: gen_kwargs max_gen_toks", new)
            # positions stay within the trained context: the prompt keeps at least half of it
            new = max(1, min(new, self.max_length // 2))
            ids = self.tok_encode(context)
            ids = ids[max(0, len(ids) - (self.max_length - new)):]
            # an empty context starts from the prefix token, as lm-eval scores one (`--model hf` crashes)
            prompts.append((ids or [self.prefix_token_id], list(until), new))
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
