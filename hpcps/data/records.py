"""Documents from record files: JSON Lines (plain or gzip), JSON arrays, Parquet and
Arrow streams (``datasets.save_to_disk``). Every record is one document: the string
in its text field.

``iter_records(source, field, start, stop)`` yields ``(text, input bytes)`` for
the records of byte range ``[start, stop)`` (a parallel rank reads part of a file;
see ``hpcps.data.plan``). Bad records are one ``UserError`` naming the file and
the line (JSON, 1-based) or row (Parquet / Arrow, 0-based as ``ds[i]`` counts).
Memory stays bounded: lines, array elements and record batches are read one at a
time (a single huge record is held whole, as it must be to tokenize it).
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from typing import Callable, Iterator, Optional

from hpcps.data.inputs import Source, line_at, read_blocks
from hpcps.errors import UserError

ARROW_BATCH_ROWS = 1024        # Parquet rows per batch (the Arrow stream has its own batches)
JSON_READ_BYTES = 1 << 20      # JSON array reader: bytes per read, and parsed text kept at most
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}


def require_pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401 - submodules used below
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError("Parquet and datasets inputs need the pyarrow package "
                        "(pip install 'hpcps[data]')") from None
    return pyarrow


def text_of(record, field: str, where: Callable[[], str]) -> str:
    """The document text of a JSON record, or a one-line error at ``where()`` (called
    only on an error: finding a line number may mean counting lines)."""
    if not isinstance(record, dict):
        raise UserError(f"{where()}: expected a JSON object, got "
                        f"{_JSON_TYPES.get(type(record))}")
    if field not in record:
        keys = ", ".join(list(record)[:8]) or "none"
        raise UserError(f"{where()}: no '{field}' field (fields: {keys}; choose one with "
                        f"--text-field)")
    value = record[field]
    if not isinstance(value, str):
        raise UserError(f"{where()}: '{field}' is {_JSON_TYPES.get(type(value), 'not text')}, "
                        f"not a string")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:   # JSON can spell a lone surrogate: "\ud800"
            raise UserError(f"{where()}: '{field}' holds the lone surrogate "
                            f"U+{ord(value[err.start]):04X}, which is not text") from None
    return value


# -- JSON Lines ----------------------------------------------------------------------------


def _lines(path: str, start: int, stop: Optional[int]) -> Iterator[tuple[int, bytes]]:
    """(file offset, line) for the lines that start in ``[start, stop)``."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            offset = start
            for line in fh:
                if stop is not None and offset >= stop:
                    return
                yield offset, line
                offset += len(line)
    except OSError as err:
        raise UserError(f"cannot read input {path}: {err.strerror}") from None


def _json_line(source: Source, line: bytes, field: str, where) -> Optional[str]:
    """The text of one JSON Lines line (None for a blank line); ``where()`` words the place."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except UnicodeDecodeError as err:
        raise UserError(f"{where()}: not UTF-8 ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{where()}: not valid JSON at column {err.colno} ({err.msg})") from None
    return text_of(record, field, where)


def _jsonl(source: Source, field: str, start: int, stop: Optional[int]):
    for offset, line in _lines(source.path, start, stop):
        text = _json_line(source, line, field,
                          lambda: f"input {source.name} line {line_at(source.path, offset)}")
        if text is not None:
            yield text, len(line)


def _jsonl_gz(source: Source, field: str):
    """Gzip streams cannot be entered mid-way: one reader per file; progress is the
    compressed bytes consumed."""
    number = 0
    try:
        with open(source.path, "rb") as raw, gzip.GzipFile(fileobj=raw) as fh:
            done = 0
            for number, line in enumerate(fh, start=1):
                text = _json_line(source, line, field,
                                  lambda: f"input {source.name} line {number}")
                if text is not None:
                    now = raw.tell()
                    yield text, now - done
                    done = now
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"input {source.name} is not a readable gzip file after line "
                        f"{number} ({err})") from None


# -- JSON arrays ---------------------------------------------------------------------------


class _JsonText:
    """A JSON file decoded incrementally: ``buf[pos:]`` is the unread text."""

    def __init__(self, source: Source):
        self.source = source
        self.blocks = read_blocks(source.path, JSON_READ_BYTES)
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()   # a BOM is not JSON
        self.buf = ""
        self.pos = 0
        self.lines_before = 1       # line number of buf[0]
        self.bytes_read = 0
        self.eof = False

    def more(self, at_least: int = 0) -> bool:
        """Append at least ``at_least`` (one read if 0) more bytes of text; False at the end
        of the file."""
        if self.eof:
            return False
        if self.pos > JSON_READ_BYTES:          # drop what has been parsed
            self.lines_before += self.buf.count("\n", 0, self.pos)
            self.buf, self.pos = self.buf[self.pos:], 0
        got = 0
        while got < max(at_least, 1):
            raw = next(self.blocks, None)
            try:
                self.buf += self.decoder.decode(raw or b"", final=raw is None)
            except UnicodeDecodeError as err:
                raise UserError(f"input {self.source.name} is not UTF-8 (byte offset "
                                f"{self.bytes_read + err.start})") from None
            if raw is None:
                self.eof = True
                return got > 0
            got += len(raw)
            self.bytes_read += len(raw)
        return True

    def line(self, pos: Optional[int] = None) -> int:
        return self.lines_before + self.buf.count("\n", 0, self.pos if pos is None else pos)

    def skip_space(self) -> str:
        """The next non-blank character ('' at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""


def _cut_by_buffer_end(err: json.JSONDecodeError, n_chars: int) -> bool:
    """Whether a parse error may only mean that the element continues past the text read
    so far: the error is at the very end (a cut number, literal or escape), or a string
    is still open. Anything else is bad JSON, reported without reading the rest."""
    return err.pos >= n_chars - 16 or err.msg.startswith("Unterminated string")


def _json_array(source: Source, field: str):
    reader = _JsonText(source)
    decoder = json.JSONDecoder()
    first = reader.skip_space()
    if first == "{":                 # datasets' to_json writes JSON Lines into .json files
        yield from _jsonl(source, field, 0, None)
        return
    if first != "[":
        raise UserError(f"input {source.name} line {reader.line()}: expected a JSON array of "
                        f"objects (or JSON Lines), found {first or 'the end of the file'!r}")
    reader.pos += 1
    element, done_bytes, want = 0, 0, JSON_READ_BYTES
    if reader.skip_space() == "]":
        reader.pos += 1
    else:
        while True:
            start = reader.pos
            try:
                record, end = decoder.raw_decode(reader.buf, start)
            except json.JSONDecodeError as err:
                if _cut_by_buffer_end(err, len(reader.buf)) and reader.more(want):
                    want *= 2                # read on, in growing steps
                    continue
                raise UserError(f"input {source.name} line {reader.line(err.pos)}: not valid "
                                f"JSON ({err.msg})") from None
            want = JSON_READ_BYTES
            text = text_of(record, field, lambda: f"input {source.name} element {element} "
                                                  f"(line {reader.line(start)})")
            reader.pos = end
            yield text, reader.bytes_read - done_bytes
            done_bytes = reader.bytes_read
            element += 1
            sep = reader.skip_space()
            reader.pos += 1
            if sep == "]":
                break
            if sep != ",":
                raise UserError(f"input {source.name} line {reader.line()}: expected ',' or "
                                f"']' after element {element - 1}, found "
                                f"{sep or 'the end of the file'!r}")
            reader.skip_space()
    if reader.skip_space():
        raise UserError(f"input {source.name} line {reader.line()}: text after the end of "
                        f"the JSON array")


# -- Parquet and Arrow ---------------------------------------------------------------------


def row_group_at(n_bytes: int, n_groups: int, offset: int) -> int:
    """The first row group whose nominal start byte is at or after ``offset``; row
    group i nominally starts at ``n_bytes * i // n_groups`` (what parallel ranks cut at)."""
    for i in range(n_groups):
        if n_bytes * i // n_groups >= offset:
            return i
    return n_groups


def _text_column(source: Source, schema, field: str, pa) -> int:
    if field not in schema.names:
        raise UserError(f"input {source.name} has no column '{field}' (columns: "
                        f"{', '.join(schema.names[:8]) or 'none'}; choose one with --text-field)")
    kind = schema.field(field).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
        raise UserError(f"input {source.name}: column '{field}' holds {kind}, not strings")
    return schema.get_field_index(field)


def _column_texts(source: Source, column, field: str, first_row: int) -> list:
    texts = column.to_pylist()
    if column.null_count:
        row = first_row + next(i for i, t in enumerate(texts) if t is None)
        raise UserError(f"input {source.name} row {row}: '{field}' is null")
    return texts


def parquet_file(source: Source):
    pa = require_pyarrow()
    try:
        # a 1 MiB read buffer streams pages instead of loading whole column chunks
        return pa.parquet.ParquetFile(source.path, buffer_size=1 << 20)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"input {source.name} is not a readable Parquet file "
                        f"({str(err).splitlines()[0]})") from None


def _parquet(source: Source, field: str, start: int, stop: Optional[int]):
    pa = require_pyarrow()
    pf = parquet_file(source)
    _text_column(source, pf.schema_arrow, field, pa)
    meta = pf.metadata
    n_groups = meta.num_row_groups
    lo = row_group_at(source.n_bytes, n_groups, start)
    hi = row_group_at(source.n_bytes, n_groups, source.n_bytes if stop is None else stop)
    if lo >= hi:
        return
    row = sum(meta.row_group(i).num_rows for i in range(lo))
    rows = sum(meta.row_group(i).num_rows for i in range(lo, hi)) or 1
    span = (source.n_bytes if stop is None else stop) - start
    done = 0
    try:
        batches = pf.iter_batches(batch_size=ARROW_BATCH_ROWS, row_groups=list(range(lo, hi)),
                                  columns=[field])
        for batch in batches:
            texts = _column_texts(source, batch.column(0), field, row)
            row += batch.num_rows
            for i, text in enumerate(texts):
                share = span * (row - batch.num_rows + i + 1) // rows  # bytes, spread by row
                yield text, share - done
                done = share
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"input {source.name} near row {row}: cannot read Parquet data "
                        f"({str(err).splitlines()[0]})") from None


def _arrow(source: Source, field: str):
    pa = require_pyarrow()
    row = 0
    try:
        with pa.OSFile(source.path) as fh:
            try:
                reader = pa.ipc.open_stream(fh)
                batches = iter(reader)
            except pa.ArrowInvalid:           # the random-access file format instead
                fh.seek(0)
                reader = pa.ipc.open_file(fh)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            index = _text_column(source, reader.schema, field, pa)
            done = 0
            for batch in batches:
                texts = _column_texts(source, batch.column(index), field, row)
                row += batch.num_rows
                now = fh.tell()
                for i, text in enumerate(texts):
                    yield text, (now - done) if i == len(texts) - 1 else 0
                done = now
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"input {source.name} is not a readable Arrow stream near row {row} "
                        f"({str(err).splitlines()[0]})") from None


def iter_records(source: Source, field: str, start: int = 0,
                 stop: Optional[int] = None) -> Iterator[tuple[str, int]]:
    """(document text, input bytes it stands for) of the records in ``[start, stop)``;
    only JSON Lines and Parquet are ever given a partial range."""
    if source.fmt == "jsonl":
        return _jsonl(source, field, start, stop)
    if source.fmt == "jsonl.gz":
        return _jsonl_gz(source, field)
    if source.fmt == "json":
        return _json_array(source, field)
    if source.fmt == "parquet":
        return _parquet(source, field, start, stop)
    if source.fmt == "arrow":
        return _arrow(source, field)
    raise ValueError(f"not a record format: {source.fmt}")
