"""`growlm demo --quick`: the whole pipeline at toy scale, on real text from the package registries."""

from __future__ import annotations

import json

from cli_util import growlm


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = growlm("demo", "--quick", "--out", "demo", timeout=600, cwd=tmp_path)  # a relative --out, as users type it
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    for png in ("loss_curves.png", "bpb_vs_depth.png"):
        assert (out / png).stat().st_size > 10_000 and f"({png})" in report
    res = json.loads((out / "results.json").read_text())
    ppl = res["ppl"]
    grown = [ppl[f"grown-glyph/stage-{n}"] for n in (1, 2, 3)]
    assert all(0 < v["bits_per_byte"] < 10 for m in ppl.values() for v in m.values())
    # every merge rule beats the off-domain specialist on each of its experts' domains
    for mix in ("mixture-mean-logits", "mixture-mean-logits+head", "mixture-mean-probs"):
        assert ppl[mix]["en"]["loss"] < ppl["specialist-ru/stage-2"]["en"]["loss"]
        assert ppl[mix]["ru"]["loss"] < ppl["specialist-en/stage-2"]["ru"]["loss"]
    assert len(grown) == 3 and {b["protocol"] for b in res["bench"]} == {"paper", "loglik"}
    assert "Grown vs monolithic" in report and "expert × domain" in report
    assert res["old_experts_unchanged"] is True
    assert ppl["mixture-mean-logits+zh"]["zh"]["loss"] < ppl["mixture-mean-logits"]["zh"]["loss"]

    # a second run never overwrites the first report silently: it is kept beside
    r = growlm("demo", "--quick", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    kept = list(tmp_path.glob("demo.prev-*"))
    assert len(kept) == 1 and (kept[0] / "report.md").read_text() == report
