"""--data as users have it: Parquet / Arrow files, datasets.save_to_disk folders, hf:NAME[:SPLIT] from the datasets
cache; reasoning and tool turns in records; bad inputs as one-line errors or counted skips."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import data as d
from pipeline.assets import sharegpt_path

ROWS = [
    {"id": "a", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello!"}]},
    {"id": "b", "messages": [{"role": "user", "content": "Weather in Paris?"},
                             {"role": "assistant", "content": None, "reasoning_content": "Call the tool.",
                              "tool_calls": [{"type": "function", "function": {"name": "weather",
                                                                               "arguments": '{"city": "Paris"}'}}]},
                             {"role": "tool", "content": "18 C", "tool_call_id": "c1"},
                             {"role": "assistant", "content": "18 C and sunny."}]},
    {"id": "c", "messages": [{"role": "user", "content": "only a question"}]},
]  # fmt: skip


def messages_of(records) -> list:
    return [(r.record_id, r.messages) if isinstance(r, d.Record) else (r.record_id, r.reason) for r in records]


def write_parquet(path: Path, rows: list[dict], **kw) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2, **kw)
    return path


def test_parquet_arrow_and_jsonl_give_the_same_records(tmp_path):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    expected = messages_of(d.read_records(jsonl))
    # Arrow gives every struct field of a column to every turn (None where a turn has none): read as absent.
    parquet = write_parquet(tmp_path / "x.parquet", ROWS)
    assert pq.read_table(parquet).column("messages")[0].as_py()[0]["tool_calls"] is None
    assert messages_of(d.read_records(parquet)) == expected
    with pa.ipc.new_stream(tmp_path / "x.arrow", pa.Table.from_pylist(ROWS).schema) as w:  # datasets' format
        w.write_table(pa.Table.from_pylist(ROWS), max_chunksize=1)
    assert messages_of(d.read_records(tmp_path / "x.arrow")) == expected
    with pa.ipc.new_file(tmp_path / "f.arrow", pa.Table.from_pylist(ROWS).schema) as w:  # the IPC file format
        w.write_table(pa.Table.from_pylist(ROWS))
    assert messages_of(d.read_records(tmp_path / "f.arrow")) == expected
    b = expected[1][1]
    assert b[1] == {"role": "assistant", "content": "", "reasoning_content": "Call the tool.",
                    "tool_calls": ROWS[1]["messages"][1]["tool_calls"]}  # fmt: skip
    assert b[2] == {"role": "tool", "content": "18 C", "tool_call_id": "c1"}
    assert expected[2] == ("c", "no_assistant_turn")


def test_folder_of_parquet_files_reads_in_name_order(tmp_path):
    write_parquet(tmp_path / "train-00001.parquet", ROWS[2:])
    write_parquet(tmp_path / "train-00000.parquet", ROWS[:2])
    report = d.StreamReport(path="", format="")
    out = list(d.read_records(tmp_path, report=report))
    assert [(r.source_index, r.record_id) for r in out] == [(0, "a"), (1, "b"), (2, "c")]
    assert report.format == "parquet" and report.records_seen == 3


def test_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(tmp_path / "saved", max_shard_size="1KB")
    source = d.open_source(tmp_path / "saved")
    assert source.format == "save_to_disk" and source.revision == ds._fingerprint and len(source.files) >= 1
    assert messages_of(d.read_records(source)) == messages_of(d.read_records(jsonl))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(tmp_path / "dict")
    with pytest.raises(d.DataError, match=r"DatasetDict with splits train, test: pass one split's directory"):
        d.open_source(tmp_path / "dict")
    assert messages_of(d.read_records(tmp_path / "dict" / "test")) == messages_of(d.read_records(jsonl))


def test_data_field_and_missing_conversation_column(tmp_path):
    rows = [{"uid": 1, "dialog": r["messages"]} for r in ROWS[:2]]
    path = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(d.DataError, match=r"d\.parquet: no conversation column \('conversations' or 'messages'; "
                       r"columns: uid, dialog\); name it with --data-field"):  # fmt: skip
        list(d.read_records(path))
    with pytest.raises(d.DataError, match=r"--data-field 'chat'"):
        list(d.read_records(path, field="chat"))
    out = list(d.read_records(path, field="dialog"))
    assert [r.record_id for r in out] == ["row-0", "row-1"] and out[0].messages == ROWS[0]["messages"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert messages_of(d.read_records(jsonl, field="dialog"))[0][1] == ROWS[0]["messages"]
    (skip,) = [r for r in d.read_records(jsonl) if isinstance(r, d.Skip)][:1]
    assert skip.reason == "missing_field" and "no 'conversations' or 'messages' field" in skip.detail


def test_unreadable_sources_are_one_line_errors(tmp_path):
    with pytest.raises(d.DataError, match="no such file or directory"):
        d.open_source(tmp_path / "nope.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(d.DataError, match=r"bad\.parquet: not a readable parquet file"):
        list(d.read_records(tmp_path / "bad.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(d.DataError, match="save_to_disk directory .* or hold .parquet or .arrow files"):
        d.open_source(tmp_path / "empty")
    with pytest.raises(d.DataError, match="name a dataset"):
        d.open_source("hf:")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A dataset 'someone/convs' (commit 0123abcd) in an empty datasets cache, with the hub unreachable: the layout
    that load_dataset writes when it downloads one."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants
    from datasets.arrow_writer import ArrowWriter

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no waiting on network time-outs here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "cache" / "someone___convs" / "default" / "0.0.0" / "0123abcd"
    folder.mkdir(parents=True)
    ds = datasets.Dataset.from_list(ROWS)
    with ArrowWriter(path=str(folder / "convs-train.arrow")) as writer:
        writer.write_table(ds.data.table)
        writer.finalize()
    datasets.DatasetInfo(dataset_name="convs", config_name="default", features=ds.features,
                         splits=[{"name": "train", "num_examples": len(ROWS), "dataset_name": "convs"}]
                         ).write_to_directory(str(folder))  # fmt: skip
    return tmp_path


def test_hf_dataset_from_the_cache_offline(hub_cache):
    jsonl = hub_cache / "x.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for spec in ("hf:someone/convs", "hf:someone/convs:train"):
        source = d.open_source(spec)
        assert (source.format, source.name, source.split, source.revision) == ("hf", "someone/convs", "train",
                                                                               "0123abcd")  # fmt: skip
        assert messages_of(d.read_records(source)) == messages_of(d.read_records(jsonl))
    fp = d.source_fingerprint(d.open_source("hf:someone/convs"))
    assert fp["path"] == "hf:someone/convs" and fp["revision"] == "0123abcd" and fp["files"] == ["convs-train.arrow"]
    with pytest.raises(d.DataError, match=r"hf:someone/convs:test: cannot load the dataset \(ValueError: Unknown "
                       r"split \"test\". Should be one of \['train'\]\.\)"):  # fmt: skip
        d.open_source("hf:someone/convs:test")
    with pytest.raises(d.DataError, match=r"hf:nobody/none: cannot load .*Hub.*only a dataset already in the "
                       "datasets cache"):  # fmt: skip
        d.open_source("hf:nobody/none")


BAD_TURNS = [
    ({"role": "tool"}, "missing_field", "a tool turn needs its result as content: messages[1]"),
    ({"role": "tool", "content": None}, "missing_field", "messages[1].content is a null, not a string"),
    ({"role": "assistant", "content": "x", "reasoning_content": 3}, "missing_field",
     "messages[1].reasoning_content is a number, not a string"),
    ({"role": "assistant", "content": "x", "thinking": ["a"]}, "missing_field",
     "messages[1].thinking is a list, not a string"),
    ({"role": "user", "content": "x", "reasoning_content": "r"}, "missing_field",
     "messages[1].reasoning_content: only assistant turns carry reasoning"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}, "missing_field",
     "messages[1].tool_calls[0] has no function.name string"),
    ({"role": "assistant", "content": None, "tool_calls": "weather()"}, "missing_field",
     "messages[1].tool_calls is a string, not a list"),
    ({"role": "assistant", "content": None}, "missing_field", "messages[1].content is a null, not a string"),
]  # fmt: skip


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_bad_turns_are_counted_skips_naming_file_record_and_field(tmp_path, fmt):
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": "q"}, turn,
                                         {"role": "assistant", "content": "a"}]}
            for i, (turn, _, _) in enumerate(BAD_TURNS)]  # fmt: skip
    rows.append({"id": "tools", "tools": 5, "messages": ROWS[0]["messages"]})
    if fmt == "jsonl":
        path = tmp_path / "bad.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:  # one file per row: the bad values have types no single Arrow column could hold together
        path = tmp_path / "bad"
        path.mkdir()
        for i, row in enumerate(rows):
            write_parquet(path / f"part-{i:02d}.parquet", [row])
    out = list(d.read_records(path))
    assert all(isinstance(s, d.Skip) for s in out), [r for r in out if isinstance(r, d.Record)]
    for i, (skip, (_, reason, detail)) in enumerate(zip(out, BAD_TURNS, strict=False)):
        assert skip.reason == reason and skip.record_id == f"r{i}" and detail in skip.detail, skip.detail
        assert f"record #{i} (id 'r{i}')" in skip.detail and "bad" in skip.detail
    assert out[-1].reason == "missing_field" and "tools is a number, not a list of objects" in out[-1].detail


def test_inline_think_blocks_become_reasoning(tmp_path):
    path = tmp_path / "r1.jsonl"
    turns = [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "<think>\nadd\n</think>\n\n4"},
             {"from": "human", "value": "3+3?"}, {"from": "gpt", "value": "<think></think>6"}]  # fmt: skip
    path.write_text(json.dumps({"id": "r", "conversations": turns}) + "\n")
    (rec,) = d.read_records(path)
    assert rec.messages[1] == {"role": "assistant", "content": "4", "reasoning_content": "add"}
    # An empty thinking block is no reasoning at all (README: Data).
    assert rec.messages[3] == {"role": "assistant", "content": "6"}


def first_sharegpt_records(n: int) -> list[dict]:
    """The first n raw records of the embedded ShareGPT file, as its JSON has them."""
    out = []
    with open(sharegpt_path(), "rb") as f:
        def read(at_least: int = 0) -> bytes:
            return f.read(max(1 << 20, at_least))

        head = read()
        report = d.StreamReport(path="", format="")
        for _, _, raw in d._array_elements(read, head, head.index(b"[") + 1, report):
            out.append(json.loads(raw))
            if len(out) == n:
                return out
    return out


@pytest.mark.slow
def test_sharegpt_as_parquet_and_save_to_disk_gives_identical_stores(tiny_llama_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    from pipeline import store as st
    from pipeline.extract.runner import ExtractConfig, run_extract
    from tests.test_extract import tensor_checksums

    raw = first_sharegpt_records(12)
    (tmp_path / "sharegpt.json").write_text(json.dumps(raw))
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "sharegpt.parquet")
    datasets.Dataset.from_list(raw).save_to_disk(tmp_path / "saved")
    stores, summaries = {}, {}
    for name in ("sharegpt.json", "sharegpt.parquet", "saved"):
        out = tmp_path / f"store-{name}"
        cfg = ExtractConfig(out=out, model=str(tiny_llama_dir), data=str(tmp_path / name), max_length=128,
                            shard_size=5, progress=False)  # fmt: skip
        summaries[name] = run_extract(cfg)
        stores[name] = out
    base = summaries["sharegpt.json"]
    keys = ("records_selected", "samples_written", "skipped", "tokens", "loss_tokens")
    for name, s in summaries.items():
        assert {k: s[k] for k in keys} == {k: base[k] for k in keys}, name
        assert tensor_checksums(stores[name]) == tensor_checksums(stores["sharegpt.json"]), name
        reader = st.StoreReader(stores[name])
        data_fp = reader.fingerprint["data"]
        assert data_fp["format"] == {"sharegpt.json": "sharegpt", "sharegpt.parquet": "parquet",
                                     "saved": "save_to_disk"}[name]  # fmt: skip
        assert data_fp["thinking"] == "drop" and data_fp["field"] is None  # SmolLM2's ChatML renders no reasoning
    saved_fp = st.StoreReader(stores["saved"]).fingerprint["data"]
    assert saved_fp["revision"] == json.loads((tmp_path / "saved" / "state.json").read_text())["_fingerprint"]
    assert base["samples_written"] > 5


def test_extract_cli_names_bad_sources_in_one_line(tiny_llama_dir, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main as cli

    path = write_parquet(tmp_path / "nocol.parquet", [{"id": "x", "text": "hello"}])
    saved = tmp_path / "dict"
    (saved).mkdir()
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    for data, message in ((path, f"error: {path}: no conversation column ('conversations' or 'messages'; columns: "
                                 "id, text); name it with --data-field"),
                          (saved, f"error: --data {saved}: a saved DatasetDict with splits train, test")):  # fmt: skip
        result = CliRunner().invoke(cli, ["extract", "--model", str(tiny_llama_dir), "--data", str(data),
                                          "--out", str(tmp_path / "store"), "--no-progress"])  # fmt: skip
        assert result.exit_code != 0 and result.output.strip().splitlines()[-1].startswith(message), result.output
        assert not (tmp_path / "store").exists()
    jsonl = tmp_path / "ok.jsonl"
    jsonl.write_text(json.dumps(ROWS[0]) + "\n")
    result = CliRunner().invoke(cli, ["extract", "--model", str(tiny_llama_dir), "--data", str(jsonl),
                                      "--out", str(tmp_path / "store"), "--thinking", "keep", "--no-progress"])  # fmt: skip
    assert result.exit_code != 0 and "error: --thinking keep: this chat template does not render" in result.output
    assert not (tmp_path / "store").exists()
