"""Draft heads through one registry: a head defined and registered in tests/ trains, exports and drafts through
the same commands as the built-in ones, with no edit to the package."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from pipeline.cli import main as cli
from pipeline.draft import registry
from pipeline.draft.eagle1 import Eagle1Config, Eagle1Head
from pipeline.train.metrics import read_metrics


def test_lookup_names_the_choices_and_refuses_a_mislabelled_head(monkeypatch):
    assert {"eagle1", "eagle3"} <= set(registry.names())
    assert registry.get("eagle3").export_formats == ("vllm", "speculators")
    with pytest.raises(ValueError, match="'nope' is not registered: choose one of .*eagle1, eagle3"):
        registry.get("nope")

    @dataclass
    class Unlabelled(Eagle1Config):  # still says variant = "eagle1"
        pass

    class Wrong(Eagle1Head):
        name = "wrong"
        config_class = Unlabelled

    with pytest.raises(ValueError, match="must carry variant = 'wrong'"):
        registry.register(Wrong())
    assert "wrong" not in registry.names()
    monkeypatch.setenv(registry.PLUGINS_ENV, "no_such_plugin_module")
    with pytest.raises(ImportError, match="PIPELINE_PLUGINS: cannot import draft-head module 'no_such_plugin_module'"):
        registry.names()


def test_a_head_registered_from_tests_trains_exports_and_drafts(tiny_store, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(registry.PLUGINS_ENV, "plugin_heads")  # tests/ is on sys.path under pytest
    run, export, report = tmp_path / "run", tmp_path / "export", tmp_path / "eval.json"
    res = CliRunner().invoke(cli, ["train", "--feats", str(tiny_store), "--variant", "tiny-eagle1", "--out", str(run),
                                   "--max-steps", "4", "--tokens-per-batch", "512", "--lr", "3e-3",
                                   "--val-fraction", "0.2", "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    record = json.loads((run / "final" / "draft.json").read_text())
    assert record["variant"] == "tiny-eagle1" and record["draft"]["note"] == "registered from tests/plugin_heads.py"
    assert record["train"]["variant"] == "tiny-eagle1"
    rows = read_metrics(run)
    assert len([r for r in rows if r["kind"] == "train"]) == 4
    held_out = [r for r in rows if r["kind"] == "val"][-1]
    assert {"cond_acc_0", "cond_acc_1", "cond_acc_2"} <= set(held_out) and "cond_acc_3" not in held_out  # its 3 steps

    res = CliRunner().invoke(cli, ["export", str(run), "--out", str(export), "--dtype", "fp32"])
    assert res.exit_code == 0 and "exported tiny-eagle1" in res.output, res.output
    assert json.loads((export / "config.json").read_text())["pipeline"]["variant"] == "tiny-eagle1"
    res = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "spec"), "--format", "speculators"])
    assert res.exit_code != 0 and "tiny-eagle1 heads export as vllm, not --format speculators" in res.output

    res = CliRunner().invoke(cli, ["eval", "--draft", str(export), "--model", str(tiny_llama_dir), "--limit", "1",
                                   "--max-new-tokens", "12", "--policy", "fixed", "--depth", "3", "--baselines", "",
                                   "--report", str(report), "--device", "cpu", "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    assert rep["draft"]["variant"] == "tiny-eagle1"
    assert rep["mismatches"] == 0 and rep["new_tokens"] > 0 and rep["acceptance_length"] >= 1.0  # lossless drafting
    assert sum(rep["per_position_attempted"]) > 0  # the head did draft


def test_unknown_variant_is_one_clear_line(tiny_store, tmp_path):
    res = CliRunner().invoke(cli, ["train", "--feats", str(tiny_store), "--variant", "nope", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "'nope' is not one of 'eagle1', 'eagle3'" in res.output
