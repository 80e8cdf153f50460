"""Seeing the mask: `pipeline inspect STORE --sample N`, per-sample loss-token shares, extraction's warning."""

from __future__ import annotations

import json
from collections import Counter

from click.testing import CliRunner

from pipeline import data as d
from pipeline.cli import main as cli
from pipeline.extract.runner import ExtractConfig, _note_loss_share, loss_share_warnings, run_extract
from pipeline.store import SampleMeta

RECORDS = [
    {"id": "paris", "messages": [{"role": "user", "content": "Capital of France?"},
                                 {"role": "assistant", "content": "Paris."},
                                 {"role": "user", "content": "And Italy?"},
                                 {"role": "assistant", "content": "Rome."}]},
    {"id": "hi", "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello!"}]},
]  # fmt: skip


def test_inspect_sample_marks_exactly_the_assistant_turns(tiny_llama_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    summary = run_extract(ExtractConfig(out=tmp_path / "store", model=str(tiny_llama_dir), data=str(data),
                                        progress=False))  # fmt: skip
    assert summary["warnings"] == [] and 0 < summary["loss_token_share"] < 1
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "store"), "--sample", "0", "--sample", "1"])
    assert result.exit_code == 0, result.output
    first, second = result.output.split("\nsample 1")
    assert first.startswith("sample 0  record 'paris' (source #0)")
    assert "<|im_start|>assistant\n⟦Paris.<|im_end|>⟧\n<|im_start|>user\nAnd Italy?<|im_end|>\n" in first
    assert "<|im_start|>assistant\n⟦Rome.<|im_end|>⟧" in first and first.split("\n", 1)[1].count("⟦") == 2
    assert "Be terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦Hello!<|im_end|>⟧" in second
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(tmp_path / "store"), "--json"]).output)
    share = info["loss_token_share_per_sample"]
    assert share["samples"] == 2 and share["outside_bounds_count"] == 0 and 0 < share["min"] <= share["max"] < 1
    text = CliRunner().invoke(cli, ["inspect", str(tmp_path / "store")]).output
    assert "loss share   per sample: min" in text
    bad = CliRunner().invoke(cli, ["inspect", str(tmp_path / "store"), "--sample", "7"])
    assert bad.exit_code != 0 and "no sample 7 (the store holds 2 samples: 0..1)" in bad.output


def test_anomalous_loss_share_is_warned():
    totals, odd = Counter(), []
    meta = SampleMeta(0, 0, "r0", False)
    _note_loss_share(d.Tokenized([1, 2, 3, 4], [0, 0, 1, 1], False), meta, totals, odd)
    assert loss_share_warnings(totals, odd) == []
    _note_loss_share(d.Tokenized([1, 2, 3, 4], [1, 0, 1, 1], False), SampleMeta(1, 1, "r1", False), totals, odd)
    _note_loss_share(d.Tokenized(list(range(100)), [0] * 99 + [1], False, context_turns=1),
                     SampleMeta(2, 2, "r2", False), totals, odd)  # fmt: skip
    (share, context) = loss_share_warnings(totals, odd)
    assert share.startswith("2 sample(s) have a loss-token share outside [2%, 98%] or loss on their first token")
    assert "'r1' (75.0%, first token), 'r2' (1.0%)" in share and "--sample N" in share
    assert context.startswith("1 assistant turn(s) were left without loss")
