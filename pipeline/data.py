"""Data ingestion: stream records out of ShareGPT / JSONL files and tokenize them with a loss mask.

Reading (:func:`read_records`) never raises on a bad record: every record either becomes a :class:`Record` or a
:class:`Skip` carrying one of these reasons (``SKIP_REASONS``):

``malformed_json``
    A JSON-array element or a JSONL line that is not valid JSON.
``invalid_utf8``
    The bytes of the element / line are not valid UTF-8, or a text field holds a lone surrogate escape (such as
    ``"\\ud83d"`` without its pair), which no tokenizer can encode.
``missing_field``
    The record is not an object, has no ``conversations``/``messages`` list, a turn lacks ``from``/``role`` or
    ``value``/``content`` (or has a non-string one), or a FIM record lacks a string ``prefix``/``suffix``/``middle``.
``unknown_role``
    A turn's role is none of human/user, gpt/chatgpt/bing/bard/assistant/model, system (case-insensitive).
``empty_conversation``
    The turn list is empty, or every turn's content is blank.
``no_assistant_turn``
    After dropping leading non-user turns (other than system) and trailing turns after the last assistant turn,
    no assistant turn is left.

Two more reasons belong to the same vocabulary but are emitted by the extraction runner after tokenization:

``render_error``
    :func:`tokenize_chat` / :func:`tokenize_fim` raised :class:`RenderError` (chat template failed, or the
    assistant spans could not be located in the rendered text).
``no_loss_tokens``
    The tokenized sample has no loss-masked token left within ``max_length``.

A file whose first non-blank byte is ``[`` is a JSON array (format ``"sharegpt"``), parsed as a stream: the
top-level elements are delimited here (string/escape state and bracket depth, jumping between structural bytes with
``re``) and each is decoded on its own, so a file cut off mid-record still yields every complete record, and the
truncation is reported in :class:`StreamReport` instead of raised. Anything else is JSONL (one object per line).

Tokenization renders with the tokenizer's own chat template and derives the loss mask generically from the
rendered text (see :func:`tokenize_chat`): no model-specific offsets or token ids.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
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
}

CHUNK_SIZE = 1 << 20


@dataclass
class Record:
    """One usable input record, normalized (exactly one of ``messages`` / ``fim`` is set)."""

    source_index: int
    record_id: str
    messages: list[dict] | None = None
    fim: dict | None = None


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


# ---------------------------------------------------------------------------------------------------- reading


def read_records(
    path: str | PathLike,
    kind: str = "chat",
    report: StreamReport | None = None,
    *,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[Record | Skip]:
    """Yield every complete record of ``path`` in file order, as a :class:`Record` or a :class:`Skip`.

    ``kind`` is ``"chat"`` or ``"fim"``. Lazy: only as much of the file is read as the records taken need.
    """
    if kind not in ("chat", "fim"):
        raise ValueError(f"kind {kind!r}: choose 'chat' or 'fim'")
    if chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size}: must be positive")
    if report is None:
        report = StreamReport(path=str(path), format="")
    return _read(str(path), kind, report, chunk_size)


def _read(path: str, kind: str, report: StreamReport, chunk_size: int) -> Iterator[Record | Skip]:
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
            yield _parse_element(raw, path, kind, index, offset, default_id)


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


def _parse_element(raw: bytes, path: str, kind: str, index: int, offset: int, default_id: str) -> Record | Skip:
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
    return _chat_record(obj, where, index, record_id)


def _where(path: str, index: int, record_id: str) -> str:
    return f"{path} record #{index} (id {record_id!r})"


def _type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


_JSON_TYPES = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
               type(None): "null"}  # fmt: skip


def _text_field(turn: dict, where: str, names: tuple[str, str]) -> tuple[str, str, None] | tuple[None, None, str]:
    """(key, string value, None) of the first of ``names`` that ``turn`` has, or (None, None, why not)."""
    key = next((k for k in names if k in turn), None)
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


def _chat_record(obj: dict, where: str, index: int, record_id: str) -> Record | Skip:
    def skip(reason: str, message: str) -> Skip:
        return Skip(index, record_id, reason, f"{where}: {message}")

    key = "conversations" if "conversations" in obj else "messages" if "messages" in obj else None
    if key is None:
        return skip("missing_field", "no 'conversations' or 'messages' field")
    turns = obj[key]
    if not isinstance(turns, list):
        return skip("missing_field", f"{key} is a {_type(turns)}, not a list")
    if not turns:
        return skip("empty_conversation", f"{key} is empty")
    messages, raw_roles = [], []
    for j, turn in enumerate(turns):
        field = f"{key}[{j}]"
        if not isinstance(turn, dict):
            return skip("missing_field", f"{field} is a {_type(turn)}, not an object")
        role_key, role, fault = _text_field(turn, field, ("from", "role"))
        if fault:
            return skip("missing_field", fault)
        norm = ROLE_MAP.get(role.strip().lower())
        if norm is None:
            return skip("unknown_role", f"{field}.{role_key} = {_clean(role)!r} is not a known role")
        content_key, content, fault = _text_field(turn, field, ("value", "content"))
        if fault:
            return skip("missing_field", fault)
        if _has_lone_surrogate(content):
            return skip("invalid_utf8", f"{field}.{content_key} holds a lone surrogate escape (not encodable text)")
        messages.append({"role": norm, "content": content})
        raw_roles.append(role)
    if all(not m["content"].strip() for m in messages):
        return skip("empty_conversation", f"every turn of {key} is blank")
    roles = [m["role"] for m in messages]
    first_user = roles.index("user") if "user" in roles else None
    last_assistant = len(roles) - 1 - roles[::-1].index("assistant") if "assistant" in roles else None
    if first_user is None or last_assistant is None or last_assistant < first_user:
        shown = ", ".join(raw_roles[:8]) + (", ..." if len(raw_roles) > 8 else "")
        return skip("no_assistant_turn", f"{key} has no assistant turn after a user turn (roles: {shown})")
    # Train on conversations the way they are served: (system,) user first. A leading assistant turn has no
    # prompt, and trailing user turns carry no loss.
    head = [m for m in messages[:first_user] if m["role"] == "system"]
    return Record(index, record_id, messages=head + messages[first_user : last_assistant + 1])


# ---------------------------------------------------------------------------------------------------- tokenizing


class RenderError(ValueError):
    """A record could not be rendered/tokenized with this tokenizer (counted as ``render_error``)."""


@dataclass
class Tokenized:
    """Token ids of one sample and its 0/1 loss mask (same length)."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool


def tokenize_chat(tokenizer, messages: list[dict], max_length: int) -> Tokenized:
    """Render ``messages`` with the tokenizer's chat template and mask the assistant turns.

    The mask marks each assistant turn's content and the end-of-turn token that closes it, nothing else. Spans are
    found on the rendered text: for assistant turn *i*, ``P`` = render(messages[:i], generation prompt) and
    ``Q`` = render(messages[:i+1]); if the full text starts with Q and Q with P, the turn is
    ``[len(P), len(Q.rstrip()))`` (the rstrip drops template glue after the end-of-turn token). Templates that are
    not prefix-stable fall back to finding each turn's content in order and extending it to the special token that
    follows. Tokens overlapping a span are masked. Raises :class:`RenderError`.
    """
    _check_max_length(max_length)
    if not messages:
        raise RenderError("no messages to render")
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = _spans_by_prefix(tokenizer, messages, full)
    if spans is None:
        spans = _spans_by_search(tokenizer, messages, full)
    return _encode(tokenizer, full, spans, max_length)


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


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # Jinja's raise_exception, TemplateError, a missing template: all per-record failures
        raise RenderError(f"chat template failed: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise RenderError(f"chat template returned a {type(text).__name__}, not a string")
    return text


def _spans_by_prefix(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]] | None:
    """Assistant spans from renders of growing prefixes; None when the template is not prefix-stable."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            p = _render(tokenizer, messages[:i], add_generation_prompt=True)
            q = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        except RenderError:
            return None
        if not (full.startswith(q) and q.startswith(p)):
            return None
        spans.append((len(p), max(len(p), len(q.rstrip()))))
    return spans


def _spans_by_search(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Fallback: find every turn's content in order; an assistant span runs to the special token after it."""
    specials = sorted(_special_tokens(tokenizer), key=len, reverse=True)
    if not specials:
        raise RenderError("chat template is not prefix-stable and the tokenizer has no special tokens to end turns")
    special_re = re.compile("|".join(map(re.escape, specials)))
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        content = message["content"]
        found = _find_content(full, content, cursor)
        if message["role"] != "assistant":
            if found is not None:
                cursor = found[1]
            continue
        if found is None or not content.strip():
            # An empty turn has nothing to anchor on: its place in the text is ambiguous.
            raise RenderError(f"chat template is not prefix-stable and assistant turn {i} could not be located in "
                              "the rendered text")  # fmt: skip
        start, end = found
        eot = special_re.search(full, end)
        if eot is None or full[end : eot.start()].strip():
            raise RenderError(f"chat template is not prefix-stable and assistant turn {i} is not followed by an "
                              "end-of-turn special token")  # fmt: skip
        spans.append((start, eot.end()))
        cursor = eot.end()
    return spans


def _find_content(text: str, content: str, cursor: int) -> tuple[int, int] | None:
    # Templates commonly trim turn contents, so try the stripped form too.
    for candidate in (content, content.strip()):
        at = text.find(candidate, cursor)
        if at >= 0:
            return at, at + len(candidate)
    return None


def _special_tokens(tokenizer) -> set[str]:
    tokens = {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added))
    return tokens


def _encode(tokenizer, text: str, spans: list[tuple[int, int]], max_length: int) -> Tokenized:
    # add_special_tokens=False: the template already wrote any BOS, exactly as apply_chat_template(tokenize=True).
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (TypeError, ValueError) as e:  # e.g. text the tokenizer cannot encode
        raise RenderError(f"tokenizer failed: {type(e).__name__}: {e}") from e
    ids = list(enc["input_ids"])
    mask = [0] * len(ids)
    spans = [s for s in spans if s[1] > s[0]]
    # A token is masked when it overlaps a span, not only when it starts in one: a pre-tokenizer may merge the
    # header's trailing "\n" with content that begins with whitespace ("\n" + " x" -> "\n ", " x"), and the
    # content's characters should still be covered by the mask. Zero-width tokens count as one character wide.
    offsets = enc["offset_mapping"]
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
    truncated = len(ids) > max_length
    return Tokenized(input_ids=ids[:max_length], loss_mask=mask[:max_length], truncated=truncated)
