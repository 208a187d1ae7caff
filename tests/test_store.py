"""The on-disk store: what a path is (resolve), a run's stages, and a stage's resumable state.

End-to-end resume (kill, resume, bit-identical weights) is in test_growth.py and test_faults.py;
here each piece is called in process on tiny fixtures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from growlm.compose import merge
from growlm.errors import GrowlmError
from growlm.growth import set_trainable
from growlm.loading import load_any
from growlm.model import GrowLM, ModelConfig
from growlm.plan import StageSpec
from growlm.store import (
    MetricsLog,
    MixtureDir,
    ModelDir,
    RunDir,
    StageCheckpoints,
    StageState,
    resolve,
    stages,
)
from growlm.store.model import read_meta
from growlm.training import make_optimizer, optimizer_step


def refused(path: Path, *needles: str) -> str:
    with pytest.raises(GrowlmError) as e:
        resolve(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------
# resolve


def test_resolve_tells_a_model_a_stage_a_run_and_a_mixture_apart(tiny_model_dir, tmp_path):
    model = resolve(tiny_model_dir)
    assert isinstance(model, ModelDir) and model.path == tiny_model_dir
    assert model.meta.fingerprint == json.loads((tiny_model_dir / "model.json").read_text())["fingerprint"]

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "stage-1")
    (run / "stage-old").mkdir()
    assert isinstance(resolve(run / "stage-1"), ModelDir)
    assert resolve(run) == RunDir(run)
    assert stages(resolve(run)) == stages(run) == [(1, run / "stage-1")]
    with pytest.raises(GrowlmError, match=r"is a training run, not a model; pass one of its stages \(e\.g\. .*stage-1\)"):
        load_any(run)

    mix = merge([tiny_model_dir, run / "stage-1"], tmp_path / "mix")
    assert resolve(mix) == MixtureDir(mix)


def test_resolve_refuses_anything_else_in_one_line(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, "is not a growlm model, mixture or run", "no model.json, mixture.json or stage-N dir")
    refused(tmp_path / "nope", "not found")
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file", "is not a directory")
    stray = tmp_path / "stray"
    shutil.copytree(tiny_model_dir, stray / "stage-old")  # a backup beside no real stage
    (stray / "stage-2").write_text("a file named like a stage")
    refused(stray, "is not a growlm model, mixture or run")
    started = tmp_path / "started"  # a run whose first stage has not finished
    started.mkdir()
    (started / "plan.json").write_text("{}")
    (started / ".lock").touch()
    (started / "checkpoints" / "stage-1").mkdir(parents=True)
    refused(started, "is a run with no finished stage yet")


def test_stages_are_in_numeric_order_and_only_the_names_training_writes(tmp_path):
    for name in ("stage-10", "stage-9", "stage-2", "stage-1", "stage-old", "stage-03", "stage-0", "stage-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "stage-4").write_text("not a dir")
    assert stages(tmp_path) == [(n, tmp_path / f"stage-{n}") for n in (1, 2, 9, 10)]
    assert stages(tmp_path / "missing") == []


# ----------------------------------------------------------------------------------------------
# In-stage state


class Batches:
    """Seeded random batches with a data position to save and restore."""

    def __init__(self) -> None:
        self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.pos)
        self.pos += 1
        rows = torch.randint(0, 64, (2, 17), generator=g)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.pos = d["pos"]


def _model() -> GrowLM:
    torch.manual_seed(0)
    model = GrowLM(ModelConfig(vocab_size=64, d_model=32, n_heads=2, n_layers=1, context=16))
    set_trainable(model, StageSpec(grow=0, train="all", tokens=1), [])
    return model


def test_checkpoint_round_trip_restores_weights_optimizer_rng_and_data(tmp_path):
    model, batches = _model(), Batches()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, 1e-2, 0.1)
    halted = torch.zeros(())
    for _ in range(3):
        x, y = batches.next()
        halted = optimizer_step(model(x, targets=y), params, opt, 1.0, halted).halted
    state = StageState(step=3, tokens=96, wall_s=1.5, last_loss=2.5)
    ckpts = StageCheckpoints(tmp_path, "stage-1")
    assert ckpts.latest() is None
    saved = ckpts.save(model, opt, batches, state, stage=1)
    assert saved == tmp_path / "checkpoints" / "stage-1" / "step-00000003" == ckpts.latest()
    rng = torch.get_rng_state()
    torch.rand(5)  # the restore must bring the RNG back

    fresh, fresh_batches, fresh_state = _model(), Batches(), StageState()
    fresh_opt = make_optimizer([p for p in fresh.parameters() if p.requires_grad], 1e-2, 0.1)
    assert ckpts.restore(fresh, fresh_opt, fresh_batches, fresh_state) == saved
    for (name, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b), name
    want, got = opt.state_dict(), fresh_opt.state_dict()
    # the hyper-parameters go through state.json: JSON turns the betas tuple into a list
    assert json.loads(json.dumps(want["param_groups"])) == got["param_groups"]
    assert want["state"].keys() == got["state"].keys()
    for i, s in want["state"].items():
        for k, v in s.items():
            assert torch.equal(v, got["state"][i][k]), (i, k)
    assert torch.equal(torch.get_rng_state(), rng)
    assert fresh_batches.pos == 3
    assert (fresh_state.step, fresh_state.tokens, fresh_state.wall_s, fresh_state.last_loss) == (3, 96, 1.5, 2.5)

    state.step = 4  # a newer checkpoint replaces the older one
    assert ckpts.save(model, opt, batches, state, stage=1).name == "step-00000004"
    assert [p.name for p in ckpts.root.iterdir()] == ["step-00000004"]
    (ckpts.latest() / "optimizer.safetensors").write_bytes(b"torn")
    with pytest.raises(GrowlmError, match=r"optimizer\.safetensors is missing or corrupted \(checksum mismatch\); remove .* to restart this stage"):
        ckpts.restore(fresh, fresh_opt, fresh_batches, fresh_state)
    ckpts.discard()
    assert not ckpts.root.exists()


def test_metrics_log_truncates_what_a_killed_process_logged_past_the_resume_point(tmp_path):
    log = MetricsLog(tmp_path)
    for stage, step in ((1, 1), (1, 2), (2, 1), (2, 2), (2, 3)):
        log.append({"stage": stage, "step": step})
    with open(log.path, "a") as f:
        f.write('{"stage": 2, "st')  # torn by a kill
    log.truncate(2, 1)
    assert [json.loads(ln) for ln in log.path.read_text().splitlines()] == \
        [{"stage": 1, "step": 1}, {"stage": 1, "step": 2}, {"stage": 2, "step": 1}]
    MetricsLog(tmp_path, rank=1).append({"stage": 3, "step": 1})  # only rank 0 writes
    assert len(log.path.read_text().splitlines()) == 3


def test_model_and_mixture_json_are_typed_records_written_byte_for_byte_as_before(tiny_model_dir, small_run, mixture, tmp_path):
    """The one writer dumps the typed record; for every kind of model dir (plain, a run's stages with and without
    LoRA, a mixture's experts, an import) the record reads back to exactly the JSON on disk, so nothing a dir
    written before the record had a type holds is lost or changed, and a new dir's bytes are what they were."""
    from growlm.files import atomic_write_json
    from growlm.interop import export_hf, import_hf
    from growlm.store.mixture import read_desc
    from growlm.store.records import MixtureRecord, ModelRecord

    imported = import_hf(export_hf(small_run / "stage-1", tmp_path / "hf"), tmp_path / "imported")
    dirs = [tiny_model_dir, small_run / "stage-1", small_run / "stage-2", *sorted((mixture / "experts").iterdir()),
            imported]
    for d in dirs:
        raw = json.loads((d / "model.json").read_text())
        record = read_meta(d)
        assert isinstance(record, ModelRecord) and record.to_json() == raw, d
        atomic_write_json(tmp_path / "again.json", record.to_json())
        assert (tmp_path / "again.json").read_bytes() == (d / "model.json").read_bytes(), d
    desc = read_desc(mixture)  # mixture.json likewise
    assert isinstance(desc, MixtureRecord) and desc.to_json() == json.loads((mixture / "mixture.json").read_text())
    atomic_write_json(tmp_path / "again.json", desc.to_json())
    assert (tmp_path / "again.json").read_bytes() == (mixture / "mixture.json").read_bytes()
