"""Shared fixtures: real artefacts (a tokenizer, substrates, models, a trained run, a mixture, an export),
each built once per test run, even across pytest-xdist's workers, and never changed by a test.

Every artefact lives under one directory made for the run (``GROWLM_TEST_SHARED``); the first worker to
ask builds it under a file lock, the others wait and reuse it. A test that changes what it is given works
on a copy (``copy_of``); at the end of the session each worker checks that every shared artefact it used
is still byte-identical to what was built. The run also gets its own ``GROWLM_CACHE``, so no test reads
or writes the user's cache, and the glyph basis and token shards are computed once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from cli_util import SMALL_PLAN, snapshot, write_plan

TEXT_EN = (
    "The quick brown fox jumps over the lazy dog. A model grows layer by layer on a frozen substrate.\n"
    "Question: What is the capital of France?\nAnswer: Paris\n"
    "Options: A) red B) green C) blue D) yellow\n"
)
TEXT_RU = "Съешь же ещё этих мягких французских булок, да выпей чаю. Модель растёт слой за слоем.\n"
TEXT_ZH = "我们的模型一层一层地生长。冻结的基底是共享的接口。\n"

SHARED = "GROWLM_TEST_SHARED"
USER_CACHE = "GROWLM_TEST_USER_CACHE"  # the user's own cache, where `growlm demo` keeps the text it downloads



def pytest_configure(config) -> None:
    # One intra-op thread in every process of the run (this one, xdist's workers, every child they start, which
    # inherit the variable): two workers of two threads each on two cores wait on each other's thread pools
    # (measured: a 6 s test took 59 s), and runs compared bit for bit across processes use one thread count.
    torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))
    if hasattr(config, "workerinput"):  # an xdist worker: the controller made the run's dirs
        return
    root = Path(tempfile.mkdtemp(prefix="growlm-tests-"))
    config._growlm_shared = root
    os.environ[SHARED] = str(root / "artefacts")
    os.environ[USER_CACHE] = os.environ.get("GROWLM_CACHE", str(Path.home() / ".cache" / "growlm"))
    os.environ["GROWLM_CACHE"] = str(root / "cache")


def pytest_unconfigure(config) -> None:
    root = getattr(config, "_growlm_shared", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.hookimpl(trylast=True)  # after `-m 'not slow'` deselected what it does: the slices count what runs
def pytest_collection_modifyitems(config, items) -> None:
    """Longest first: the end-to-end jobs (marked ``e2e``, the longest with their usual ``seconds`` on two
    cores), then the tests that start processes (``process``), then the rest, so that xdist's workers share
    out the long tests before the short ones and none is left with a long one at the end.

    Under ``--dist worksteal`` (``make test``) that order is also dealt out among the workers. worksteal first
    hands each of the N workers one contiguous slice of the collection (the first ``len // N`` tests, then
    ``len(rest) // (N - 1)`` ...), and a worker that runs dry steals the far end of another's queue, never its
    head. Sorted longest first and cut in slices, every long job sat at the head of the first worker's slice, and
    that worker ran them one after another (the compile check, lm-eval, the demo, the GPU dry run, the dead
    ranks: 12 minutes of a 13-minute run on a busy host) while the others took everything else. So each long
    job goes to the slice expected to finish first, every slice keeps its own longest first, and the slices
    keep worksteal's sizes."""
    def expected(item) -> float:
        e2e = item.get_closest_marker("e2e")
        if e2e is not None:
            return e2e.kwargs.get("seconds", 10)
        return 5 if item.get_closest_marker("process") else 0

    items.sort(key=expected, reverse=True)
    worker = getattr(config, "workerinput", {})
    workers = int(worker.get("workercount", 1))
    if worker.get("dist") != "worksteal" or len(items) < workers:
        return
    sizes, left = [], len(items)
    for i in range(workers):
        sizes.append(left // (workers - i))
        left -= sizes[-1]
    slices: list[list] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for item in items:  # longest first, each to the slice with room that is expected to finish first
        j = min((j for j in range(workers) if len(slices[j]) < sizes[j]), key=lambda j: (load[j], j))
        slices[j].append(item)
        load[j] += expected(item)
    items[:] = [item for s in slices for item in s]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """pytest-xdist's controller, for each worker it starts: the run's ``--dist`` mode, which a worker's own config
    no longer holds (it is "no" there), for :func:`pytest_collection_modifyitems` in the worker."""
    node.workerinput["dist"] = node.config.getoption("dist")


class Artefacts:
    """The run's shared artefacts: each built by the first worker that asks, under a file lock, then reused."""

    def __init__(self, root: Path) -> None:
        self.root, self.used = root, set()

    def get(self, name: str, build: Callable[[Path], object]) -> Path:
        """The artefact ``name``: the dir ``build(dir)`` wrote (it creates ``dir`` itself)."""
        self.root.mkdir(parents=True, exist_ok=True)
        d, done = self.root / name, self.root / f"{name}.built.json"
        with FileLock(str(self.root / f"{name}.lock")):
            if not done.exists():
                shutil.rmtree(d, ignore_errors=True)
                build(d)
                done.write_text(json.dumps(snapshot(d)))
        self.used.add(name)
        return d

    def check_unchanged(self) -> None:
        for name in sorted(self.used):
            built = json.loads((self.root / f"{name}.built.json").read_text())
            now = json.loads(json.dumps(snapshot(self.root / name)))  # as recorded: tuples become lists
            assert now == built, f"a test changed the shared artefact {name!r}: use copy_of"


@pytest.fixture(scope="session", autouse=True)
def artefacts() -> Artefacts:
    """The shared artefacts; after the session, every one this worker used is byte-identical to what was built."""
    a = Artefacts(Path(os.environ[SHARED]))
    yield a
    a.check_unchanged()


def _in(d: Path) -> Path:
    """``d``, made: for an artefact written below a dir of its own."""
    d.mkdir()
    return d


def copy_of(src: Path, dst: Path) -> Path:
    """A private copy of a shared artefact, free to change."""
    return Path(shutil.copytree(src, dst, symlinks=True))


@pytest.fixture(scope="session")
def corpus_dir(artefacts) -> Path:
    """A small mixed-language corpus: train.txt, valid.txt, en.txt, ru.txt."""
    def build(d: Path) -> None:
        d.mkdir()
        (d / "train.txt").write_text((TEXT_EN + TEXT_RU + TEXT_ZH) * 40, encoding="utf-8")
        (d / "valid.txt").write_text((TEXT_EN + TEXT_RU + TEXT_ZH) * 4, encoding="utf-8")
        (d / "en.txt").write_text(TEXT_EN * 60, encoding="utf-8")
        (d / "ru.txt").write_text(TEXT_RU * 60, encoding="utf-8")

    return artefacts.get("corpus", build)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(artefacts, corpus_dir) -> Path:
    """A compact bvv241-style tokenizer over the fixture corpus, saved to disk."""
    from growlm.tokenizer import build_tokenizer

    return artefacts.get("tokenizer", lambda d: build_tokenizer([corpus_dir / "train.txt"], compact=True).save(d))


@pytest.fixture(scope="session")
def foreign_tokenizer(artefacts, corpus_dir) -> Path:
    """A tokenizer built from other text (Russian only): another tokenizer fingerprint."""
    from growlm.tokenizer import build_tokenizer

    return artefacts.get("foreign-tokenizer", lambda d: build_tokenizer([corpus_dir / "ru.txt"], compact=True).save(d))


@pytest.fixture(scope="session")
def tiny_model_dir(artefacts, tiny_tokenizer_dir) -> Path:
    """A randomly initialised 2-block model over the 16-bit binary substrate, saved as a model dir."""
    return artefacts.get("model", lambda d: save_tiny_model(tiny_tokenizer_dir, d, seed=0))


@pytest.fixture(scope="session")
def expert_b(artefacts, tiny_tokenizer_dir) -> Path:
    """A second expert on the tiny model's docking port, its weights drawn from another seed."""
    return artefacts.get("expert-b", lambda d: save_tiny_model(tiny_tokenizer_dir, d, seed=1))


@pytest.fixture(scope="session")
def mixture(artefacts, tiny_model_dir, expert_b) -> Path:
    """The tiny model and ``expert_b`` merged by the default rule (the mean of logits)."""
    from growlm.api import merge

    return artefacts.get("mixture", lambda d: merge([tiny_model_dir, expert_b], _in(d) / "mix", progress=False)) / "mix"


@pytest.fixture(scope="session")
def hf_export(artefacts, tiny_model_dir) -> Path:
    """The tiny model exported as a Hugging Face checkpoint."""
    from growlm.interop import export_hf

    return artefacts.get("hf", lambda d: export_hf(tiny_model_dir, _in(d) / "export")) / "export"


@pytest.fixture(scope="session")
def small_run(artefacts, corpus_dir) -> Path:
    """``SMALL_PLAN`` trained uninterrupted: stage 1 grows 2 blocks, stage 2 one more with LoRA adapters on the
    frozen ones. The plan and its data sit beside it (``small_run.parent / "plan.toml"``)."""
    from growlm.training import train

    return artefacts.get("small-run", lambda d: train(write_plan(_in(d), SMALL_PLAN, corpus_dir), d / "run", progress=False)) / "run"


def save_tiny_model(tokenizer_dir: Path, out: Path, seed: int) -> Path:
    """A 2-block model over the 16-bit binary substrate of ``tokenizer_dir``, its weights drawn from
    ``seed``, saved as the model dir ``out``: models of different seeds share one docking port."""
    from growlm.model import GrowLM, ModelConfig
    from growlm.store.model import save_model
    from growlm.substrate import build_substrate
    from growlm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    sub = build_substrate("binary", dim=64, tokenizer=tok, bits=16)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_heads=4, n_layers=2, context=128, embed_dim=16)
    torch.manual_seed(seed)
    model = GrowLM(cfg)
    with torch.no_grad():
        model.embed.weight.copy_(sub.table)
        g = torch.Generator().manual_seed(seed)
        for blk in model.blocks:
            blk.init_weights(g)
        model.head.weight.normal_(0, 0.02, generator=g)
    save_model(model, out, tokenizer_dir=tokenizer_dir,
               substrate={"kind": sub.kind, "fingerprint": sub.fingerprint, "recipe": sub.recipe})
    return out
