"""Data ingestion: stream records out of ShareGPT JSON / JSONL files, Parquet / Arrow tables, datasets
``save_to_disk`` folders and ``hf:NAME[:SPLIT]`` datasets (:func:`open_source`), and tokenize them with a loss mask.

Reading (:func:`read_records`) never raises on a bad record: every record either becomes a :class:`Record` or a
:class:`Skip` carrying one of these reasons (``SKIP_REASONS``):

``malformed_json``
    A JSON-array element or a JSONL line that is not valid JSON.
``invalid_utf8``
    The bytes of the element / line are not valid UTF-8, or a text field holds a lone surrogate escape (such as
    ``"\\ud83d"`` without its pair), which no tokenizer can encode.
``missing_field``
    The record is not an object, has no ``conversations``/``messages`` list (or no ``--data-field``), a turn lacks
    ``from``/``role`` or ``value``/``content`` (or has a non-string one; an assistant turn calling tools may have
    none), a reasoning field is not a string or sits on a non-assistant turn, ``tool_calls`` are not OpenAI
    function calls, ``tools`` is not a list of objects, or a FIM record lacks a string ``prefix``/``suffix``/``middle``.
``unknown_role``
    A turn's role is none of human/user, gpt/chatgpt/bing/bard/assistant/model, system, tool/ipython/observation/
    function (case-insensitive).
``empty_conversation``
    The turn list is empty, or every turn's content is blank.
``no_assistant_turn``
    After dropping leading non-user turns (other than system) and trailing turns after the last assistant turn,
    no assistant turn is left.

Two more reasons belong to the same vocabulary but are emitted by the extraction runner after tokenization:

``render_error``
    :func:`tokenize_chat` / :func:`tokenize_fim` raised :class:`RenderError` (chat template failed, or what the
    model generates for the last assistant turn could not be derived or located in the rendered text).
``no_loss_tokens``
    The tokenized sample has no loss-masked token left within ``max_length``.

A file whose first non-blank byte is ``[`` is a JSON array (format ``"sharegpt"``), parsed as a stream: the
top-level elements are delimited here (string/escape state and bracket depth, jumping between structural bytes with
``re``) and each is decoded on its own, so a file cut off mid-record still yields every complete record, and the
truncation is reported in :class:`StreamReport` instead of raised. Anything else is JSONL (one object per line).
Tables are read a record batch at a time; a table without the conversation column raises :class:`DataError`.

Tokenization renders with the tokenizer's own chat template as a serving engine does and masks exactly what the
served model generates for each assistant turn (see :func:`tokenize_chat`): no model-specific offsets or token ids.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

SKIP_REASONS: tuple[str, ...] = (
    "malformed_json",
    "invalid_utf8",
    "missing_field",
    "unknown_role",
    "empty_conversation",
    "no_assistant_turn",
    "render_error",
    "no_loss_tokens",
)

DEFAULT_FIM_TOKENS: tuple[str, str, str] = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")

ROLE_MAP: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "ipython": "tool",
    "observation": "tool",
    "function": "tool",
}

CHUNK_SIZE = 1 << 20


@dataclass
class Record:
    """One usable input record, normalized (exactly one of ``messages`` / ``fim`` is set)."""

    source_index: int
    record_id: str
    messages: list[dict] | None = None
    fim: dict | None = None
    tools: list[dict] | None = None  # tool schemas for the chat template (the record's ``tools``)


@dataclass
class Skip:
    """A record that cannot be used; counted by reason, never fatal."""

    source_index: int
    record_id: str
    reason: str
    detail: str


@dataclass
class StreamReport:
    """Filled in by :func:`read_records` while iterating.

    ``truncated_at_byte`` is the offset where the incomplete trailing record starts; when a JSON array is merely
    never closed (no partial record), it is the file size.
    """

    path: str
    format: str
    records_seen: int = 0
    truncated: bool = False
    truncated_at_byte: int | None = None
    bytes_read: int = 0


# ---------------------------------------------------------------------------------------------------- sources


class DataError(ValueError):
    """A data source that cannot be read at all (not one bad record): a one-line message naming what is wrong."""


TABLE_SUFFIXES = (".parquet", ".arrow")
CHAT_FIELDS = ("conversations", "messages")
TABLE_BATCH_ROWS = 256  # rows converted to Python at a time: a table is streamed, never loaded whole


@dataclass(frozen=True)
class DataSource:
    """What ``--data`` names, resolved: the format and the local files read, in order.

    ``format``: ``json`` (a ShareGPT JSON array or JSONL; told apart when read), ``parquet``, ``arrow`` (Arrow IPC
    stream or file, as ``datasets`` writes them), ``save_to_disk`` (a ``datasets.Dataset.save_to_disk``
    directory) or ``hf`` (``hf:NAME[:SPLIT]`` through ``datasets.load_dataset``, which reads its cache when the
    hub cannot be reached). ``revision`` identifies the dataset version where one exists (the save_to_disk
    fingerprint, the hub commit of the cached copy).
    """

    spec: str
    format: str
    files: tuple[str, ...]
    field: str | None = None
    name: str | None = None
    split: str | None = None
    revision: str | None = None


def open_source(data: str | PathLike, field: str | None = None) -> DataSource:
    """Resolve ``--data`` into a :class:`DataSource`; :class:`DataError` (one line) when it cannot be read."""
    spec = str(data)
    if spec.startswith("hf:"):
        return _open_hub(spec, field)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"--data {spec}: no such file or directory")
    if path.is_dir():
        return _open_directory(path, spec, field)
    if path.suffix in TABLE_SUFFIXES:
        return DataSource(spec, path.suffix[1:], (str(path),), field)
    return DataSource(spec, "json", (str(path),), field)


def _open_directory(path: Path, spec: str, field: str | None) -> DataSource:
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"--data {spec}: a saved DatasetDict with splits {', '.join(splits)}: pass one split's "
                        f"directory, e.g. --data {path / (splits[0] if splits else 'train')}")  # fmt: skip
    if (path / "state.json").exists():
        state = json.loads((path / "state.json").read_text())
        files = tuple(str(path / f["filename"]) for f in state.get("_data_files", []))
        missing = [f for f in files if not Path(f).exists()]
        if not files or missing:
            raise DataError(f"--data {spec}: state.json lists data files that are not there "
                            f"({', '.join(missing) or 'none listed'})")  # fmt: skip
        return DataSource(spec, "save_to_disk", files, field, split=state.get("_split"),
                          revision=state.get("_fingerprint"))  # fmt: skip
    tables = sorted(p for p in path.iterdir() if p.suffix in TABLE_SUFFIXES)
    kinds = {p.suffix for p in tables}
    if not tables or len(kinds) > 1:
        raise DataError(f"--data {spec}: a directory must be a datasets.save_to_disk directory (state.json) or "
                        f"hold .parquet or .arrow files of one kind (found {len(tables)}: {sorted(kinds)})")  # fmt: skip
    return DataSource(spec, kinds.pop()[1:], tuple(map(str, tables)), field)


def _open_hub(spec: str, field: str | None) -> DataSource:
    """``hf:NAME[:SPLIT]``: ``datasets.load_dataset`` prepares (or finds in its cache) Arrow files, read from disk."""
    name, _, split = spec[3:].partition(":")
    if not name:
        raise DataError(f"--data {spec}: name a dataset, hf:NAME[:SPLIT]")
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"--data {spec} needs the 'datasets' package ({e}); run `pip install 'pipeline[hf]'` "
                        "(scripts/setup.sh installs it)") from e  # fmt: skip
    datasets.logging.set_verbosity_error()  # its cache fallback warns on stderr; the fingerprint says what was read
    try:
        loaded = datasets.load_dataset(name, split=split or None)
    except Exception as e:  # ConnectionError, DatasetNotFoundError, a bad split (ValueError), ...: one line
        message = " ".join(str(e).split())
        raise DataError(f"--data {spec}: cannot load the dataset ({type(e).__name__}: {message}); without a hub "
                        "connection only a dataset already in the datasets cache can be used") from e  # fmt: skip
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if len(names) != 1 and "train" not in names:
            raise DataError(f"--data {spec}: choose a split, hf:{name}:SPLIT (splits: {', '.join(names)})")
        split = names[0] if len(names) == 1 else "train"
        loaded = loaded[split]
    files = tuple(f["filename"] for f in loaded.cache_files)
    if not files or loaded._indices is not None:
        raise DataError(f"--data {spec}: the loaded split is not a plain set of Arrow files in the cache")
    # The cache folder of a hub dataset is .../<config>/<version>/<commit of the hub repository>/.
    return DataSource(spec, "hf", files, field, name=name, split=split or loaded.split and str(loaded.split),
                      revision=Path(files[0]).parent.name)  # fmt: skip


def source_fingerprint(source: DataSource) -> dict:
    """What a store's fingerprint records about its data: the source, its format and a digest of its bytes."""
    import hashlib

    digest = hashlib.sha256()
    for name in source.files:
        with open(name, "rb") as f:
            while block := f.read(CHUNK_SIZE):
                digest.update(block)
    out = {"path": source.spec if source.format == "hf" else str(Path(source.spec).resolve()),
           "sha256": digest.hexdigest(), "field": source.field}  # fmt: skip
    if source.format != "json":
        out.update(files=[Path(f).name for f in source.files], dataset=source.name, split=source.split,
                   revision=source.revision)  # fmt: skip
    return out


def _table_batches(name: str, fmt: str) -> tuple[Any, Iterator[Any]]:
    """(schema, record batches) of one Parquet or Arrow file, read a batch at a time (Arrow memory-mapped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(name)
            return pf.schema_arrow, pf.iter_batches(batch_size=TABLE_BATCH_ROWS)
        source = pa.memory_map(name)
        try:
            reader = pa.ipc.open_stream(source)  # what datasets writes
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
        return reader.schema, iter(reader)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{name}: not a readable {fmt} file ({type(e).__name__}: {e})") from e


def _read_table(source: DataSource, kind: str, report: StreamReport) -> Iterator[Record | Skip]:
    report.format, report.records_seen, report.bytes_read = source.format, 0, 0
    report.truncated, report.truncated_at_byte = False, None
    index = 0
    for name in source.files:
        schema, batches = _table_batches(name, "parquet" if name.endswith(".parquet") else "arrow")
        columns = set(schema.names)
        if kind == "fim":
            missing = [c for c in ("prefix", "suffix", "middle") if c not in columns]
            if missing:
                raise DataError(f"{name}: no {', '.join(missing)} column for FIM records (columns: "
                                f"{', '.join(schema.names)})")  # fmt: skip
            key = None
        else:
            key = source.field or next((c for c in CHAT_FIELDS if c in columns), None)
            if key not in columns:
                wanted = f"--data-field {source.field!r}" if source.field else " or ".join(map(repr, CHAT_FIELDS))
                raise DataError(f"{name}: no conversation column ({wanted}; columns: {', '.join(schema.names)}); "
                                "name it with --data-field")  # fmt: skip
        report.bytes_read += os.path.getsize(name)
        for batch in batches:
            for row in batch.to_pylist():
                report.records_seen = index + 1
                record_id = _clean(_record_id(row, f"row-{index}"))
                where = _where(name, index, record_id)
                if kind == "fim":
                    yield _fim_record(row, where, index, record_id)
                else:
                    yield _chat_record(row, where, index, record_id, key)
                index += 1


# ---------------------------------------------------------------------------------------------------- reading


def read_records(
    path: str | PathLike | DataSource,
    kind: str = "chat",
    report: StreamReport | None = None,
    *,
    chunk_size: int = CHUNK_SIZE,
    field: str | None = None,
) -> Iterator[Record | Skip]:
    """Yield every complete record of ``path`` in source order, as a :class:`Record` or a :class:`Skip`.

    ``path`` is anything :func:`open_source` accepts (or its result); ``kind`` is ``"chat"`` or ``"fim"``;
    ``field`` names the column / key holding the conversation (default: ``conversations`` or ``messages``). Lazy:
    only as much of the source is read as the records taken need. A table without the conversation column, or an
    ``hf:`` dataset that cannot be loaded, raises :class:`DataError` when iteration starts.
    """
    if kind not in ("chat", "fim"):
        raise ValueError(f"kind {kind!r}: choose 'chat' or 'fim'")
    if chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size}: must be positive")
    source = path if isinstance(path, DataSource) else open_source(path, field)
    if report is None:
        report = StreamReport(path=source.spec, format="")
    if source.format == "json":
        return _read(source.files[0], kind, report, chunk_size, source.field)
    return _read_table(source, kind, report)


def _read(path: str, kind: str, report: StreamReport, chunk_size: int,
          field: str | None = None) -> Iterator[Record | Skip]:  # fmt: skip
    # A report reused for a second pass must describe that pass only.
    report.path, report.records_seen, report.bytes_read = path, 0, 0
    report.truncated, report.truncated_at_byte = False, None
    with open(path, "rb") as f:

        def read(at_least: int = 0) -> bytes:
            # Growing reads keep a record much larger than chunk_size linear rather than quadratic to assemble.
            data = f.read(max(chunk_size, at_least))
            report.bytes_read += len(data)
            return data

        head = read()
        start = len(_BOM) if head.startswith(_BOM) else 0
        # Leading whitespace could fill whole chunks: read on until the first meaningful byte.
        while (first := _WS.match(head, start).end()) == len(head) and (data := read()):
            head += data
        if first < len(head) and head[first] == 0x5B:  # '['
            report.format = "sharegpt"
            elements = _array_elements(read, head, first + 1, report)
        else:
            report.format = "jsonl"
            elements = _jsonl_lines(read, head, start, report)
        for index, (offset, line, raw) in enumerate(elements):
            report.records_seen = index + 1
            default_id = f"line-{line}" if line else f"record-{index}"
            yield _parse_element(raw, path, kind, index, offset, default_id, field)


_BOM = b"\xef\xbb\xbf"
_WS = re.compile(rb"[ \t\r\n]*")
_WS_COMMA = re.compile(rb"[ \t\r\n,]*")
# The rest of a JSON string after its opening quote, up to and including the closing quote. Unrolled so that the
# common run of ordinary bytes is one fast character-class loop; a failed match (string continues past the
# buffer) costs linear time.
_STRING_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SCALAR_END = re.compile(rb"[ \t\r\n,\]]")
# Inside a container: a bracket, a whole string (skipped at C speed, so brackets inside strings never count),
# or a lone quote when the string is not terminated within the buffer.
_TOKEN = re.compile(rb'[{}\[\]]|"[^"\\]*(?:\\.[^"\\]*)*"|"', re.S)
_OPEN = frozenset(b"{[")


def _scan(buf: bytes, pos: int, depth: int) -> tuple[int | None, int, int]:
    """Continue delimiting a JSON value in ``buf`` from ``pos`` at bracket ``depth``.

    Returns ``(end, pos, depth)``: ``end`` is the offset just after the value, or None when the buffer ends first
    (then ``pos``/``depth`` are where to resume once more bytes are appended). Mismatched bracket kinds are not
    detected here; ``json.loads`` of the delimited element reports them.
    """
    if depth == 0:
        c = buf[pos]
        if c == 0x22:  # a top-level string
            m = _STRING_REST.match(buf, pos + 1)
            return (m.end(), m.end(), 0) if m else (None, pos, 0)
        if c not in _OPEN:  # a bare scalar (or junk): runs to the next separator
            m = _SCALAR_END.search(buf, pos)
            return (m.start(), m.start(), 0) if m else (None, pos, 0)
    for m in _TOKEN.finditer(buf, pos):
        c = buf[m.start()]
        if c == 0x22:
            if m.end() == m.start() + 1:  # a lone quote: the string runs past the buffer
                return None, m.start(), depth
        elif c == 0x7B or c == 0x5B:
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return m.end(), m.end(), 0
    return None, len(buf), depth


def _array_elements(read, buf: bytes, pos: int, report: StreamReport) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(file offset, 0, bytes)`` for each complete top-level element of a JSON array.

    ``buf`` holds the file from offset 0 and ``pos`` points just after the opening ``[``.
    """
    base = 0  # file offset of buf[0]
    while True:
        pos = _WS_COMMA.match(buf, pos).end()
        if pos == len(buf):
            base += pos
            buf, pos = read(), 0
            if not buf:  # EOF between elements: only the closing ']' is missing
                report.truncated, report.truncated_at_byte = True, base
                return
            continue
        if buf[pos] == 0x5D:  # ']': the array is closed; whatever follows it is ignored
            return
        start, scan_pos, depth = pos, pos, 0
        while True:
            end, scan_pos, depth = _scan(buf, scan_pos, depth)
            if end is not None:
                break
            # Keep only the element being delimited and resume scanning where it stopped.
            data = read(len(buf) - start)
            if not data:
                report.truncated, report.truncated_at_byte = True, base + start
                return
            base += start
            buf, scan_pos, start = buf[start:] + data, scan_pos - start, 0
        yield base + start, 0, buf[start:end]
        pos = end


def _jsonl_lines(read, buf: bytes, pos: int, report: StreamReport) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(file offset, 1-based line number, bytes)`` for each non-blank line of a JSONL file."""
    base, line, eof = 0, 0, False
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0 and not eof:
            data = read(len(buf) - pos)
            if data:
                base += pos
                buf, pos = buf[pos:] + data, 0
                continue
            eof = True
        if nl < 0 and pos == len(buf):
            return
        last = nl < 0
        end = len(buf) if last else nl
        line += 1
        raw, offset, pos = buf[pos:end], base + pos, end + 1
        body = raw.lstrip()
        if not body.strip():
            if last:  # a blank last line without a newline: the end (continuing would loop forever)
                return
            continue
        if last and body[0] in b'{["' and _scan(body, 0, 0)[0] is None:
            # A final line without newline whose object/string never closes: the file was cut off.
            report.truncated, report.truncated_at_byte = True, offset
            return
        yield offset, line, raw
        if last:
            return


# ---------------------------------------------------------------------------------------------------- records


def _parse_element(raw: bytes, path: str, kind: str, index: int, offset: int, default_id: str,
                   field: str | None = None) -> Record | Skip:  # fmt: skip
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _invalid_utf8(raw, e, path, index, offset, default_id)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        at = offset + len(text[: e.pos].encode())
        return Skip(index, default_id, "malformed_json",
                    f"{_where(path, index, default_id)}: not valid JSON ({e.msg} at file byte {at})")  # fmt: skip
    except (ValueError, RecursionError) as e:
        return Skip(index, default_id, "malformed_json", f"{_where(path, index, default_id)}: not valid JSON ({e})")
    record_id = _clean(_record_id(obj, default_id))
    where = _where(path, index, record_id)
    if not isinstance(obj, dict):
        return Skip(index, record_id, "missing_field", f"{where}: the record is a {_type(obj)}, not an object")
    if kind == "fim":
        return _fim_record(obj, where, index, record_id)
    return _chat_record(obj, where, index, record_id, field)


def _where(path: str, index: int, record_id: str) -> str:
    return f"{path} record #{index} (id {record_id!r})"


def _type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


_JSON_TYPES = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
               type(None): "null"}  # fmt: skip


def _text_field(turn: dict, where: str, names: tuple[str, str]) -> tuple[str, str, None] | tuple[None, None, str]:
    """(key, string value, None) of the first of ``names`` that ``turn`` has, or (None, None, why not)."""
    # A null counts as absent when another name is set: Arrow tables give every struct field of a column.
    key = next((k for k in names if turn.get(k) is not None), next((k for k in names if k in turn), None))
    if key is None:
        return None, None, f"{where} has no {names[0]!r} or {names[1]!r} field"
    value = turn[key]
    if not isinstance(value, str):
        return None, None, f"{where}.{key} is a {_type(value)}, not a string"
    return key, value, None


def _record_id(obj: Any, default: str) -> str:
    rid = obj.get("id") if isinstance(obj, dict) else None
    if rid is None or isinstance(rid, (dict, list)) or rid == "":
        return default
    return str(rid)


def _invalid_utf8(raw: bytes, err: UnicodeDecodeError, path: str, index: int, offset: int, default_id: str) -> Skip:
    # Parse once more with the bad bytes smuggled through as lone surrogates, to name the record and field.
    record_id, field = default_id, None
    try:
        obj = json.loads(raw.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        pass
    else:
        record_id, field = _clean(_record_id(obj, default_id)), _surrogate_field(obj, "")
    where = f" in {_clean(field)}" if field else ""
    return Skip(index, record_id, "invalid_utf8", f"{_where(path, index, record_id)}: invalid UTF-8 byte "
                f"0x{raw[err.start]:02x} at file byte {offset + err.start}{where}")  # fmt: skip


def _surrogate_field(value: Any, name: str) -> str | None:
    """The path (``conversations[2].value``) of the first string holding an escaped undecodable byte."""
    if isinstance(value, str):
        return name or "(record)" if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return f"{name}.{key}" if name else key
        sub = f"{name}[{key}]" if isinstance(key, int) else f"{name}.{key}" if name else key
        found = _surrogate_field(item, sub)
        if found:
            return found
    return None


_SURROGATE = re.compile("[\udc80-\udcff]")
# Any lone surrogate: from the escaped bytes above, or from a JSON escape such as "\ud83d" without its pair. Text
# holding one cannot be encoded, so no tokenizer accepts it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(text: str) -> bool:
    return not text.isascii() and _LONE_SURROGATE.search(text) is not None  # isascii: a C-speed shortcut


def _clean(text: str) -> str:
    """``text`` with lone surrogates shown as escapes, safe to encode (ids and details end up in Arrow files)."""
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _fim_record(obj: dict, where: str, index: int, record_id: str) -> Record | Skip:
    fim = {}
    for key in ("prefix", "suffix", "middle"):
        if key not in obj:
            return Skip(index, record_id, "missing_field", f"{where}: no '{key}' field")
        if not isinstance(obj[key], str):
            return Skip(index, record_id, "missing_field",
                        f"{where}: {key} is a {_type(obj[key])}, not a string")  # fmt: skip
        if _has_lone_surrogate(obj[key]):
            return Skip(index, record_id, "invalid_utf8", f"{where}: {key} holds a lone surrogate escape")
        fim[key] = obj[key]
    return Record(index, record_id, fim=fim)


def _chat_record(obj: dict, where: str, index: int, record_id: str, field: str | None = None) -> Record | Skip:
    def skip(reason: str, message: str) -> Skip:
        return Skip(index, record_id, reason, f"{where}: {message}")

    key = field or next((k for k in CHAT_FIELDS if obj.get(k) is not None), None)
    if key is None or key not in obj:
        wanted = repr(field) if field else "'conversations' or 'messages'"
        return skip("missing_field", f"no {wanted} field")
    turns = obj[key]
    if not isinstance(turns, list):
        return skip("missing_field", f"{key} is a {_type(turns)}, not a list")
    if not turns:
        return skip("empty_conversation", f"{key} is empty")
    tools, fault = _tools_of(obj)
    if fault:
        return skip("missing_field", fault)
    messages, raw_roles = [], []
    for j, turn in enumerate(turns):
        name = f"{key}[{j}]"
        if not isinstance(turn, dict):
            return skip("missing_field", f"{name} is a {_type(turn)}, not an object")
        role_key, role, fault = _text_field(turn, name, ("from", "role"))
        if fault:
            return skip("missing_field", fault)
        norm = ROLE_MAP.get(role.strip().lower())
        if norm is None:
            return skip("unknown_role", f"{name}.{role_key} = {_clean(role)!r} is not a known role")
        message, fault = _message(turn, name, norm)
        if fault:
            return skip(*fault)
        messages.append(message)
        raw_roles.append(role)
    if all(not (m["content"].strip() or m.get("reasoning_content", "").strip() or m.get("tool_calls"))
           for m in messages):  # fmt: skip
        return skip("empty_conversation", f"every turn of {key} is blank")
    roles = [m["role"] for m in messages]
    first_user = roles.index("user") if "user" in roles else None
    last_assistant = len(roles) - 1 - roles[::-1].index("assistant") if "assistant" in roles else None
    if first_user is None or last_assistant is None or last_assistant < first_user:
        shown = ", ".join(raw_roles[:8]) + (", ..." if len(raw_roles) > 8 else "")
        return skip("no_assistant_turn", f"{key} has no assistant turn after a user turn (roles: {shown})")
    # Train on conversations the way they are served: (system,) user first. A leading assistant turn has no
    # prompt, and trailing user or tool turns carry no loss.
    head = [m for m in messages[:first_user] if m["role"] == "system"]
    return Record(index, record_id, messages=head + messages[first_user : last_assistant + 1], tools=tools)


def _message(turn: dict, name: str, role: str) -> tuple[dict, None] | tuple[None, tuple[str, str]]:
    """One normalized message ``{role, content[, reasoning_content, tool_calls, tool_call_id, name]}``, or the
    (reason, detail) of the skip. An assistant turn may have no content when it calls tools (OpenAI's null)."""
    calls = turn.get("tool_calls")
    if calls is not None and role != "assistant":
        return None, ("missing_field", f"{name}.tool_calls: only assistant turns call tools (role {role!r})")
    if calls is not None:
        fault = _check_tool_calls(calls, f"{name}.tool_calls")
        if fault:
            return None, ("missing_field", fault)
    if calls and all(turn.get(k) is None for k in ("value", "content")):
        content_key, content = "content", ""
    else:
        content_key, content, fault = _text_field(turn, name, ("value", "content"))
        if fault:
            what = "a tool turn needs its result as content: " if role == "tool" else ""
            return None, ("missing_field", what + fault)
    if _has_lone_surrogate(content):
        return None, ("invalid_utf8", f"{name}.{content_key} holds a lone surrogate escape (not encodable text)")
    message = {"role": role, "content": content}
    reasoning_key = next((k for k in REASONING_FIELDS if turn.get(k) is not None), None)
    if reasoning_key is not None:
        reasoning = turn[reasoning_key]
        if role != "assistant":
            return None, ("missing_field", f"{name}.{reasoning_key}: only assistant turns carry reasoning")
        if not isinstance(reasoning, str):
            return None, ("missing_field", f"{name}.{reasoning_key} is a {_type(reasoning)}, not a string")
        if _has_lone_surrogate(reasoning):
            return None, ("invalid_utf8", f"{name}.{reasoning_key} holds a lone surrogate escape")
    elif role == "assistant" and (split := _THINK_IN_CONTENT.match(content)):
        # DeepSeek-R1-style data: the reasoning inline, "<think>...</think>answer"
        reasoning, message["content"] = split.group(1), content[split.end() :]
    else:
        reasoning = None
    if reasoning is not None and reasoning.strip():  # an empty thinking block is no reasoning (README: Data)
        message["reasoning_content"] = reasoning.strip("\n")
    if calls:
        message["tool_calls"] = calls
    for extra in ("tool_call_id", "name"):
        if role == "tool" and isinstance(turn.get(extra), str):
            message[extra] = turn[extra]
    return message, None


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_THINK_IN_CONTENT = re.compile(r"\s*<think>(.*?)</think>\s*", re.S)


def _check_tool_calls(calls: Any, name: str) -> str | None:
    if not isinstance(calls, list):
        return f"{name} is a {_type(calls)}, not a list"
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return f"{name}[{i}] has no function.name string (OpenAI format: {{'function': {{'name', 'arguments'}}}})"
        if not isinstance(function.get("arguments"), (str, dict)):
            return f"{name}[{i}].function.arguments is a {_type(function.get('arguments'))}, not an object or string"
    return None


def _tools_of(obj: dict) -> tuple[list | None, str | None]:
    """The record's tool schemas (``tools``: a list of objects, or that list as a JSON string), or why not."""
    tools = obj.get("tools")
    if tools is None or tools == "":
        return None, None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            return None, f"tools is a string that is not JSON ({e})"
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        return None, f"tools is a {_type(tools)}, not a list of objects"
    return tools or None, None


# ---------------------------------------------------------------------------------------------------- tokenizing


class RenderError(ValueError):
    """A record could not be rendered/tokenized with this tokenizer (counted as ``render_error``)."""


THINKING_MODES = ("auto", "keep", "drop")


@dataclass
class Tokenized:
    """Token ids of one sample and its 0/1 loss mask (same length).

    ``context_turns``: assistant turns left without loss because the template rewrites them in later history (a
    reasoning template drops their thinking), so their tokens are not what the model generated at that turn.
    """

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool
    context_turns: int = 0


def tokenize_chat(tokenizer, messages: list[dict], max_length: int, *, thinking: str = "keep",
                  tools: list[dict] | None = None) -> Tokenized:  # fmt: skip
    """Render ``messages`` with the tokenizer's chat template and mask what the served model generates.

    For assistant turn *i*, ``P`` = render(messages[:i], generation prompt) is the prompt a serving engine builds
    and ``Q`` = render(messages[:i+1]); the model generates ``G = Q[len(P):]`` (content, reasoning where the
    template renders it, tool calls, the end-of-turn token; template glue after it is dropped by an rstrip). A
    template whose ``Q`` does not extend ``P`` cannot say what the model generates: RenderError, never a guess.
    ``G`` is then located in the render of the whole conversation, in order (at ``len(P)`` when the template is
    prefix-stable). A turn whose ``G`` is not there (its thinking dropped from later history) stays context
    without loss (``context_turns``); the last assistant turn must be found. ``thinking``: ``keep`` renders
    reasoning (``reasoning_content``, also passed as ``thinking``) with ``enable_thinking=True``, ``drop`` removes
    it and passes ``enable_thinking=False``; a record without any reasoning renders as ``drop``, so that an empty
    thinking block is prompt (as a server puts it with thinking off), not a loss token. Raises RenderError.
    """
    _check_max_length(max_length)
    if not messages:
        raise RenderError("no messages to render")
    if thinking not in ("keep", "drop"):
        raise ValueError(f"thinking {thinking!r}: choose keep or drop (resolve auto with resolve_thinking)")
    keep = thinking == "keep" and any(m.get("reasoning_content") for m in messages)
    render = _Renderer(tokenizer, keep, tools)
    full = render(messages, add_generation_prompt=False)
    spans, context_turns = _assistant_spans(render, messages, full)
    tok = _encode(tokenizer, full, spans, max_length)
    tok.context_turns = context_turns
    return tok


class _Renderer:
    """apply_chat_template with one record's reasoning mode and tools, as a serving engine calls it."""

    def __init__(self, tokenizer, keep_thinking: bool, tools: list[dict] | None):
        self.tokenizer, self.keep, self.tools = tokenizer, keep_thinking, tools

    def __call__(self, messages: list[dict], add_generation_prompt: bool) -> str:
        shown = []
        for m in messages:
            m = dict(m)
            reasoning = m.pop("reasoning_content", None)
            if self.keep and reasoning:  # Qwen3 / DeepSeek templates read reasoning_content, gpt-oss's thinking
                m["reasoning_content"] = m["thinking"] = reasoning
            shown.append(m)
        kwargs = {"enable_thinking": self.keep}
        if self.tools:
            kwargs["tools"] = self.tools
        return _render(self.tokenizer, shown, add_generation_prompt, **kwargs)


def render_chat(tokenizer, messages: list[dict], *, thinking: str, tools: list[dict] | None = None,
                add_generation_prompt: bool = True) -> str:  # fmt: skip
    """The chat template's text for ``messages`` as :func:`tokenize_chat` renders it (``thinking`` keep/drop)."""
    keep = thinking == "keep" and (add_generation_prompt or any(m.get("reasoning_content") for m in messages))
    return _Renderer(tokenizer, keep, tools)(messages, add_generation_prompt)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of generated text: what precedes the first ``</think>`` (its ``<think>`` may sit in the
    generation prompt, as DeepSeek-R1 templates put it), or (None, text) when there is none."""
    head, sep, answer = text.partition("</think>")
    if not sep:
        return None, text
    return head.strip().removeprefix("<think>").strip("\n"), answer.lstrip()


def resolve_thinking(tokenizer, requested: str = "auto") -> str:
    """``keep`` or ``drop`` for this template: ``auto`` keeps reasoning where the template renders it in the turn
    being generated, ``keep`` on a template that never does is a ValueError naming the remedy."""
    if requested not in THINKING_MODES:
        raise ValueError(f"--thinking {requested!r}: choose one of {', '.join(THINKING_MODES)}")
    if requested == "drop":
        return "drop"
    probe = [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello", "reasoning_content": _PROBE_REASONING}]  # fmt: skip
    try:
        text = _Renderer(tokenizer, True, None)(probe, add_generation_prompt=False)
    except RenderError:
        text = ""
    if _PROBE_REASONING in text:
        return "keep"
    if requested == "keep":
        raise ValueError("--thinking keep: this chat template does not render an assistant turn's reasoning "
                         "(reasoning_content / thinking) in the turn being generated, so thinking cannot be "
                         "trained on with it; use --thinking drop (or auto)")  # fmt: skip
    return "drop"


_PROBE_REASONING = "probe-reasoning-7f3a"


def check_chat_template(tokenizer, thinking: str) -> None:
    """Refuse (ValueError, one line) a template whose generated tokens cannot be derived, before any record is
    read: a two-turn probe conversation (with reasoning when ``thinking`` is keep) must tokenize."""
    reasoning = {"reasoning_content": "Let me think."} if thinking == "keep" else {}
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", **reasoning},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!", **reasoning}]  # fmt: skip
    try:
        tokenize_chat(tokenizer, probe, 1 << 20, thinking=thinking)
    except RenderError as e:
        raise ValueError(f"the chat template cannot be used for a loss mask: {e}") from e


def check_fim_tokens(tokenizer, fim_tokens: tuple[str, str, str] = DEFAULT_FIM_TOKENS) -> list[int]:
    """The ids of the three FIM tokens; ValueError naming any the tokenizer does not have as one token."""
    if len(fim_tokens) != 3:
        raise ValueError(f"--fim-tokens needs three tokens (prefix, suffix, middle), got {list(fim_tokens)}")
    ids, missing = [], []
    for token in fim_tokens:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) == 1 and tokenizer.convert_ids_to_tokens(encoded[0]) == token:
            ids.append(encoded[0])
        else:
            missing.append(token)
    if missing:
        raise ValueError(f"the tokenizer has no single token for FIM marker(s) {', '.join(map(repr, missing))}; pass "
                         "the tokens this model was trained with via --fim-tokens PREFIX,SUFFIX,MIDDLE")  # fmt: skip
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no eos token to close the FIM middle")
    return ids


def tokenize_fim(tokenizer, fim: dict, max_length: int,
                 fim_tokens: tuple[str, str, str] = DEFAULT_FIM_TOKENS) -> Tokenized:  # fmt: skip
    """PSM fill-in-the-middle: ``<pre> prefix <suf> suffix <mid> middle eos``; loss on middle and eos.

    A tokenizer lacking a FIM token is a configuration error, not a per-record one: it raises ValueError (from
    :func:`check_fim_tokens`), which callers must not count as a ``render_error`` skip.
    """
    _check_max_length(max_length)
    check_fim_tokens(tokenizer, fim_tokens)
    pre, suf, mid = fim_tokens
    try:
        head = pre + fim["prefix"] + suf + fim["suffix"] + mid
        text = head + fim["middle"] + tokenizer.eos_token
    except (KeyError, TypeError) as e:
        raise RenderError(f"FIM record needs string prefix/suffix/middle: {e}") from e
    return _encode(tokenizer, text, [(len(head), len(text))], max_length)


def _check_max_length(max_length: int) -> None:
    if max_length < 1:
        raise ValueError(f"max_length {max_length}: must be at least 1")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)  # fmt: skip
    except Exception as e:  # Jinja's raise_exception, TemplateError, a missing template: all per-record failures
        raise RenderError(f"chat template failed: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise RenderError(f"chat template returned a {type(text).__name__}, not a string")
    return text


def _assistant_spans(render, messages: list[dict], full: str) -> tuple[list[tuple[int, int]], int]:
    """(character spans of the generated text of every assistant turn found in ``full``, turns left as context)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    spans, cursor, context_turns = [], 0, 0
    for i, message in enumerate(messages):
        if message["role"] == "system":  # templates move it (Mistral: into the last user turn): no anchor
            continue
        if message["role"] != "assistant":
            found = _find_content(full, message["content"], cursor) if message["content"].strip() else None
            if found is not None:
                cursor = found[1]
            continue
        p = render(messages[:i], add_generation_prompt=True)
        q = render(messages[: i + 1], add_generation_prompt=False)
        if not q.startswith(p):
            at = next((k for k, (a, b) in enumerate(zip(p, q, strict=False)) if a != b), min(len(p), len(q)))
            raise RenderError(f"assistant turn {i}: the template's render of the turn does not extend its generation "
                              f"prompt (prompt ends {p[at:][:40]!r}, the turn renders {q[at:][:40]!r}), so the tokens "
                              "the model generates cannot be derived from it")  # fmt: skip
        generated = q[len(p) :].rstrip()
        if full.startswith(q) and cursor <= len(p):
            at = len(p)
        else:
            at = full.find(generated, cursor) if generated else -1
            if at >= 0 and not _next_turn_follows(full, messages, i, at + len(generated)):
                at = -1  # the text matched a later turn's, not this one's
        if at < 0:
            if i == last:
                raise RenderError(f"assistant turn {i} (the last): what the model generates for it "
                                  f"({generated[:40]!r}...) does not appear in the rendered conversation")  # fmt: skip
            context_turns += 1
            continue
        spans.append((at, at + len(generated)))
        cursor = at + len(generated)
    return spans, context_turns


def _next_turn_follows(full: str, messages: list[dict], i: int, end: int) -> bool:
    """Whether the next non-assistant turn's content (if any) still lies after ``end``."""
    following = next((m for m in messages[i + 1 :] if m["role"] in ("user", "tool") and m["content"].strip()), None)
    return following is None or _find_content(full, following["content"], end) is not None


def _find_content(text: str, content: str, cursor: int) -> tuple[int, int] | None:
    # Templates commonly trim turn contents, so try the stripped form too.
    for candidate in (content, content.strip()):
        at = text.find(candidate, cursor)
        if at >= 0:
            return at, at + len(candidate)
    return None


def _encode(tokenizer, text: str, spans: list[tuple[int, int]], max_length: int) -> Tokenized:
    """Token ids of ``text`` with the ``spans`` masked, tokenized the way a server runs each turn: the text before
    a span (the prompt) and each span (what the model generated) are encoded on their own, so a pre-tokenizer
    cannot merge a prompt's trailing "\\n\\n" with the answer's first characters into tokens the served model never
    saw. Where the pieces' tokens do not decode to the text (a tokenizer that prefixes every encoded piece with a
    space, or decodes lossily), the whole text is encoded at once and every token overlapping a span is masked."""
    spans = [s for s in spans if s[1] > s[0]]
    # add_special_tokens=False: the template already wrote any BOS, exactly as apply_chat_template(tokenize=True).
    try:
        bounds = [0, *(x for span in spans for x in span), len(text)]
        pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
        encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"] if text else []
        ids = [t for piece in encoded for t in piece]
        mask = [k % 2 for k, piece in enumerate(encoded) for _ in piece]  # pieces alternate prompt / span
        if _decoded(tokenizer, ids) != text:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, mask = list(enc["input_ids"]), _overlap_mask(enc["offset_mapping"], spans)
    except (TypeError, ValueError) as e:  # e.g. text the tokenizer cannot encode
        raise RenderError(f"tokenizer failed: {type(e).__name__}: {e}") from e
    truncated = len(ids) > max_length
    return Tokenized(input_ids=ids[:max_length], loss_mask=mask[:max_length], truncated=truncated)


def _decoded(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _overlap_mask(offsets, spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token overlapping a span. Zero-width tokens count as one character wide."""
    mask = [0] * len(offsets)
    starts = [s for s, _ in offsets]
    ends = [max(e, s + 1) for s, e in offsets]
    if starts == sorted(starts) and ends == sorted(ends):
        for a, b in spans:
            lo, hi = bisect.bisect_right(ends, a), bisect.bisect_left(starts, b)
            mask[lo:hi] = [1] * max(0, hi - lo)
    else:  # offsets out of order (unusual tokenizer): test every token
        for t, (start, end) in enumerate(zip(starts, ends, strict=True)):
            if any(a < end and start < b for a, b in spans):
                mask[t] = 1
    return mask
