"""`pipeline demo` (the README's first command) end to end on the real SmolLM2, shrunk to a minute or two."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from pipeline.cli import main as cli

pytestmark = pytest.mark.slow


def test_demo_end_to_end_and_rerun_reuses_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--records", "10", "--max-length", "256", "--eagle1-steps", "2",
            "--eagle3-steps", "2", "--questions", "1", "--max-new-tokens", "6", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "demo.json").read_text())
    heads = [r for r in rows if r["head"] in ("eagle1", "eagle3")]
    assert [(r["head"], r["mode"]) for r in heads] == [("eagle1", "chain"), ("eagle1", "tree"),
                                                        ("eagle3", "chain"), ("eagle3", "tree")]  # fmt: skip
    # the baselines decoded in the same run sit beside the heads, lossless too
    assert [r["head"] for r in rows[len(heads):]] == ["transformers generate", "prompt lookup (10)"]
    assert all(r["mismatches"] == 0 for r in rows[len(heads):])
    for r in heads:
        assert r["mismatches"] == 0 and r["acceptance_length"] >= 1.0
        assert (out / "exports" / r["head"] / "config.json").exists()
    table = res.output.split("== result")[1]
    assert re.search(r"eagle3\s+tree", table) and "mismatches" in table

    again = CliRunner().invoke(cli, args)  # every finished stage is reused, nothing is retrained
    assert again.exit_code == 0, again.output
    assert again.output.count("reusing the finished run") == 2
