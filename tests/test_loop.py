"""The training loop's step itself: the on-device non-finite guard, host reads per step, torch.compile.

Plan-level behaviour (stages, resume, faults through the CLI) is in test_growth.py and test_faults.py.
"""

from __future__ import annotations

import pytest
import torch

from cli_util import SMALL_PLAN, write_plan
from growlm.errors import GrowlmError
from growlm.growth import set_trainable
from growlm.loading import load_model
from growlm.model import GrowLM, ModelConfig
from growlm.plan import StageSpec, TrainSpec
from growlm.training import Loop, train

CFG = ModelConfig(vocab_size=256, d_model=64, n_heads=2, n_layers=2, context=32)


class FixedBatches:
    """Seeded random token batches with the interface ``Loop.fit`` reads (no tokenizer needed)."""

    def __init__(self, batch_size: int = 4, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.batch_size, self.last_sequence_ids = batch_size, []

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * CFG.context

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(0, CFG.vocab_size, (self.batch_size, CFG.context + 1), generator=self.g)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {}


class PoisonAt(torch.nn.Module):
    """The model, except that the loss of forward call ``at`` (1-based) is NaN."""

    def __init__(self, model: GrowLM, at: int) -> None:
        super().__init__()
        self.model, self.at, self.calls = model, at, 0

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.model(x, targets=targets)
        return loss * float("nan") if self.calls == self.at else loss


def fresh_model() -> GrowLM:
    torch.manual_seed(0)
    model = GrowLM(CFG)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a substrate is never all zeros: with one, block 0's first norm could not train
        model.embed.weight.normal_(generator=g)
    for b in model.blocks:
        b.init_weights(g)
    set_trainable(model, StageSpec(grow=0, train="all", tokens=1), [])
    return model


def fit(tmp_path, module: torch.nn.Module, n_steps: int, **spec) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    loop = Loop(tmp_path, TrainSpec(device="cpu", dtype="fp32", **spec), progress=False, log=lambda *a: None)
    loop.fit("stage-1", module, FixedBatches(), [], n_steps=n_steps, lr=1e-2, stage=1, resume_hint="-",
             declared={n for n, p in module.named_parameters() if p.requires_grad})


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_nan_step_is_named_and_no_update_after_it_lands(tmp_path):
    """The host looks at the losses only every ``log_every`` steps, yet the error names the first bad step
    and the weights are exactly those after the last good one: later updates were skipped on the device."""
    flat = {"warmup": 0.0, "min_lr_ratio": 1.0, "checkpoint_every": 100}  # the same lr at every step
    clean = fresh_model()
    fit(tmp_path / "clean", clean, n_steps=3, log_every=100, **flat)
    poisoned = PoisonAt(fresh_model(), at=4)
    with pytest.raises(GrowlmError, match="stage 1 step 4: the loss or gradient norm is not finite"):
        fit(tmp_path / "poisoned", poisoned, n_steps=10, log_every=8, **flat)
    assert poisoned.calls == 8  # it ran on to the next host read...
    after, expected = weights(poisoned.model), weights(clean)
    for k in expected:  # ...but steps 4-8 changed nothing
        assert torch.equal(after[k], expected[k]), k
    assert not (tmp_path / "poisoned" / "checkpoints").exists()


def test_checkpoint_is_never_written_past_a_bad_step(tmp_path):
    poisoned = PoisonAt(fresh_model(), at=2)
    with pytest.raises(GrowlmError, match="step 2"):
        fit(tmp_path, poisoned, n_steps=10, log_every=100, checkpoint_every=3)
    assert poisoned.calls == 3 and not any((tmp_path / "checkpoints").glob("*/step-*"))


def test_optimizer_step_reports_the_gradient_norm_before_clipping():
    """The norm the log reports is the whole gradient's, before the clip scales it down."""
    from growlm.training import make_optimizer, optimizer_step

    x, y = FixedBatches().next()
    ref = fresh_model()
    ref(x, targets=y).backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]))
    assert expected > 1e-3  # so a clip at 1e-3 scales the gradient down
    for clip, want in ((1e-3, expected.item()), (0.0, None)):
        model = fresh_model()
        params = [p for p in model.parameters() if p.requires_grad]
        step = optimizer_step(model(x, targets=y), params, make_optimizer(params, 1e-2, 0.0), clip, torch.zeros(()))
        assert step.halted == 0 and torch.isfinite(step.loss)
        assert step.grad_norm is None if want is None else step.grad_norm.item() == pytest.approx(want, rel=1e-5)


def test_step_does_not_read_the_device_every_step(tmp_path, monkeypatch):
    """Host reads (``.item()``, ``float()``, ``.tolist()``, ``bool()``) happen per log interval, not per step."""
    reads = []
    for name in ("item", "__float__", "tolist", "__bool__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name: reads.append(_n) or _o(self, *a))
    fit(tmp_path, fresh_model(), n_steps=24, log_every=12, checkpoint_every=100)
    assert len(reads) <= 24 // 12 + 1, reads


@pytest.mark.e2e(seconds=90)  # a cold compile: 60-104 s on two cores, the longest job of the run
def test_compiled_plan_matches_eager(small_run, corpus_dir, tmp_path):
    """``train.compile = true`` (the CUDA default) through a grow stage and a LoRA stage (peft) on CPU in fp32:
    the same losses and weights as eager (the shared ``small_run``: SMALL_PLAN, which on a CPU is eager fp32),
    within float tolerance. Pinned to the CPU: on a GPU machine ``auto`` means bf16, where compiled and eager
    kernels round differently (tests/test_cuda.py covers compile there)."""
    if torch.cuda.is_available():
        pytest.skip("small_run trains on the GPU here; tests/test_cuda.py compares compile there")
    torch._dynamo.reset()
    text = SMALL_PLAN.replace("log_every = 2", 'log_every = 2\ndevice = "cpu"\ndtype = "fp32"\ncompile = true')
    compiled = train(write_plan(tmp_path, text, corpus_dir), tmp_path / "run", progress=False)[-1]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # both stages really were compiled
    a, b = load_model(small_run / "stage-2"), load_model(compiled)
    assert b.meta.metrics.valid_loss == pytest.approx(a.meta.metrics.valid_loss, rel=1e-4)
    wa, wb = weights(a.model), weights(b.model)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-4)  # Adam magnifies float noise in tiny grads
