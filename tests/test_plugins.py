"""A plugin package, pip-installed, extends every growlm command with no import of the user's own: the
``growlm.plugins`` entry point names a module holding docs/extending.md's examples (a substrate kind, a combine
rule and an eval task, as written there), and a fresh ``growlm`` process accepts each by name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_util import child_env, growlm, one_line_error
from test_extending import example

PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "growlm-toy-plugin"
version = "0.1"

[project.entry-points."growlm.plugins"]
toy = "growlm_toy_plugin"

[tool.setuptools]
py-modules = ["growlm_toy_plugin"]
"""

# one fresh process, several commands: entry points are read as a process starts using the registries
COMMANDS = """
import sys
from growlm.cli import main
argvs = [a.split("\\t") for a in sys.argv[1:]]
sys.exit(max(main(argv) for argv in argvs))
"""


@pytest.mark.process
@pytest.mark.e2e(seconds=12)
def test_a_pip_installed_plugin_adds_a_kind_a_rule_and_a_task(tiny_model_dir, expert_b, tmp_path):
    src, site = tmp_path / "plugin", tmp_path / "site"
    src.mkdir()
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "growlm_toy_plugin.py").write_text("\n\n".join(
        example(s) for s in ("A substrate kind", "A combine rule", "An eval task")))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, env=child_env(), cwd=tmp_path)
    (tmp_path / "echo.jsonl").write_text("".join(json.dumps({"word": w, "other": o}) + "\n"
                                                 for w, o in (("cat", "dog"), ("sun", "moon"))))
    argvs = [["substrate", "build", "--kind", "digits", "--param", "base=4", "--vocab-size", "300", "--dim", "8",
              "--out", str(tmp_path / "sub")],
             ["merge", str(tiny_model_dir), str(expert_b), "--combine", "max-logits", "--out", str(tmp_path / "mix")],
             ["eval", str(tmp_path / "mix"), "--task", "echo", "--data", str(tmp_path / "echo.jsonl"),
              "--protocol", "loglik", "--json"]]
    r = subprocess.run([sys.executable, "-c", COMMANDS, *("\t".join(a) for a in argvs)], capture_output=True,
                       text=True, env=child_env(site), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "sub" / "substrate.json").read_text())["kind"] == "digits"
    assert json.loads((tmp_path / "mix" / "mixture.json").read_text())["combine"] == "max-logits"
    assert json.loads(r.stdout.strip().splitlines()[-1])["task"] == "echo"
    # without the plugin, the names are unknown, in one line
    one_line_error(growlm("substrate", "build", "--kind", "digits", "--vocab-size", "3", "--dim", "8", "--out",
                          str(tmp_path / "no")), "digits")


def test_a_plugin_that_fails_to_import_is_one_line(monkeypatch):
    from importlib.metadata import EntryPoint

    from growlm import registry

    broken = EntryPoint(name="broken", value="no_such_module_for_growlm", group=registry.PLUGIN_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [broken])
    registry._import_plugins.cache_clear()
    try:
        one_line_error(growlm("merge", "a", "b", "--combine", "x", "--out", "m"), "plugin 'broken'",
                       "no_such_module_for_growlm")
    finally:
        monkeypatch.undo()
        registry._import_plugins.cache_clear()
