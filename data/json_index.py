"""Random access to the records of a huge JSON list without holding it in memory.

Mix2M is a 2.4M-record JSON list; `json.load` would make it many GB of Python objects in every DataLoader worker.
The file is scanned once, record by record, and the byte span of each record is saved as an int64 array in a cache
file keyed by the JSON's path, size and mtime; later opens memory-map that array (16 bytes per record, shared by
all workers through the page cache) and read one record with a seek.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_BLOCK = 16 << 20  # bytes read at a time while indexing
_MAX_RECORD = 256 << 20  # a "record" longer than this means the JSON is malformed
_WS = re.compile(r"[ \t\n\r]*")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alignkd" / "json_index"


class DataFileError(ValueError):
    """A data file that cannot be read as a JSON list of records. The message reads
    "FILE: record N / byte offset K: what is wrong" (without the record where the problem lies outside any)."""


def _where(path: Path, record: int | None, offset: int) -> str:
    return f"{path}: " + (f"record {record} / " if record is not None else "") + f"byte offset {offset}"


class _Scanner:
    """Walks a JSON list in blocks, yielding the byte span of each top-level element."""

    def __init__(self, f, path: Path):
        self.f, self.path = f, path
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos, self.byte_pos, self.eof = "", 0, 0, False
        self.bytes_read = 0
        self.count = 0  # records yielded so far: the index of the record being scanned
        self.bad: tuple[int, bytes, str] | None = None  # a non-UTF-8 sequence past the decoded text
        self.raw_decode = json.JSONDecoder().raw_decode

    def _fill(self) -> bool:
        """Append a block to the buffer (dropping what was consumed); False at end of file. Text is decoded up to
        the first invalid UTF-8 byte; asking for more than that raises, naming the record that holds the byte."""
        if self.bad is not None:
            offset, seq, reason = self.bad
            raise DataFileError(f"{_where(self.path, self.count, offset)}: not UTF-8 text (bytes {seq!r}: {reason}); "
                                "the data file must be UTF-8 JSON")
        if self.eof:
            return False
        block = self.f.read(_BLOCK)
        self.eof = not block
        pending = len(self.decoder.getstate()[0])  # bytes of a sequence cut by the previous block
        try:
            new = self.decoder.decode(block, final=self.eof)
        except UnicodeDecodeError as e:
            new = e.object[:e.start].decode("utf-8")
            self.bad = (self.bytes_read - pending + e.start, e.object[e.start:e.end], e.reason)
        self.bytes_read += len(block)
        self.text = self.text[self.pos:] + new
        self.pos = 0
        return bool(block) or self.bad is not None  # the next call raises

    def _advance(self, new_pos: int) -> None:
        self.byte_pos += self._bytes(self.pos, new_pos)
        self.pos = new_pos

    def _bytes(self, start: int, end: int) -> int:
        skipped = self.text[start:end]
        return len(skipped) if skipped.isascii() else len(skipped.encode("utf-8"))

    def _peek(self) -> str:
        """Next non-whitespace character ("" at end of file), consuming the whitespace."""
        while True:
            self._advance(_WS.match(self.text, self.pos).end())
            if self.pos < len(self.text) or not self._fill():
                return self.text[self.pos:self.pos + 1]

    def _error(self, what: str, record: bool = True, at: int | None = None) -> DataFileError:
        """The error at the cursor, or at character `at` of the buffer."""
        offset = self.byte_pos + (self._bytes(self.pos, at) if at is not None else 0)
        return DataFileError(f"{_where(self.path, self.count if record else None, offset)}: {what}")

    def _value_end(self) -> int:
        """End of the JSON value at the cursor, reading more blocks while the buffer cuts it off."""
        while True:
            try:
                end = self.raw_decode(self.text, self.pos)[1]
                # a value ending exactly at the buffer's end may go on in the next block (a number)
                if end < len(self.text) or self.eof:
                    return end
                self._fill()
            except json.JSONDecodeError as e:
                rel = e.pos - self.pos  # _fill re-bases the buffer at the cursor
                msg = e.msg[:-3] + " here" if e.msg.endswith(" starting at") else e.msg
                if len(self.text) - self.pos > _MAX_RECORD:
                    raise self._error(f"invalid JSON ({msg}) in a record over {_MAX_RECORD >> 20} MB",
                                      at=self.pos + rel) from None
                if not self._fill():
                    at = self.pos + rel
                    cut = " (the file ends inside this record: cut short?)" \
                        if at >= len(self.text.rstrip()) or msg.startswith("Unterminated string") else ""
                    raise self._error(f"invalid JSON: {msg}{cut}", at=at) from None

    def spans(self):
        if self._peek() == "\ufeff" and self.byte_pos == 0:  # a UTF-8 byte order mark, as some editors write
            self._advance(self.pos + 1)
        c = self._peek()
        if c != "[":
            found = {"{": "a JSON object", "": "an empty file"}.get(c, repr(c))
            raise self._error(f"not a JSON list of LLaVA records: found {found} where the list's '[' should be "
                              "(the file must read [{...}, {...}, ...])", record=False)
        self._advance(self.pos + 1)
        if self._peek() == "]":
            self._advance(self.pos + 1)
            self._check_end()
            return
        while True:
            start = self.byte_pos
            self._advance(self._value_end())
            yield start, self.byte_pos
            self.count += 1
            c = self._peek()
            if c == "]":
                self._advance(self.pos + 1)
                self._check_end()
                return
            if c != ",":
                found = "the end of the file (cut short?)" if c == "" else repr(c)
                raise self._error(f"expected ',' or ']' after record {self.count - 1}, found {found}")
            self._advance(self.pos + 1)
            self._peek()

    def _check_end(self) -> None:
        c = self._peek()
        if c:
            raise self._error(f"found {c!r} after the list's closing ']': the file must hold one JSON list",
                              record=False)


def build_offsets(path: Path) -> np.ndarray:
    """[N, 2] int64 byte spans (start, end) of the records of the JSON list at `path`; DataFileError when the file
    is not a UTF-8 JSON list."""
    try:
        with open(path, "rb") as f:
            spans = np.fromiter((x for span in _Scanner(f, path).spans() for x in span), dtype=np.int64)
    except IsADirectoryError:
        raise DataFileError(f"{path}: is a folder, not a JSON file") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataFileError(f"{path}: cannot be read: {e.strerror or e}") from None
    return spans.reshape(-1, 2)


class JsonListIndex:
    """`index[i]` is the i-th record of a JSON list file, parsed on demand."""

    def __init__(self, path: str | Path, cache_dir: str | Path | None = None):
        self.path = Path(path).resolve()
        st = self.path.stat()
        key = hashlib.sha256(f"{self.path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_file = cache_dir / f"{self.path.stem}-{key}.npy"
        if not self.cache_file.is_file():
            log.info("indexing %s (once; cached in %s)", self.path, self.cache_file)
            offsets = build_offsets(self.path)
            cache_dir.mkdir(parents=True, exist_ok=True)
            # write then rename, so concurrent ranks never read a half-written index
            fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, offsets)
            os.replace(tmp, self.cache_file)
        self._offsets: np.ndarray | None = None

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:  # opened lazily, so a pickled index (DataLoader workers) maps it anew
            self._offsets = np.load(self.cache_file, mmap_mode="r")
        return self._offsets

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_offsets": None}

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> bytes:
        start, end = (int(x) for x in self.offsets[i])
        with open(self.path, "rb") as f:  # a handle per read: safe across fork, cheap next to image decoding
            f.seek(start)
            return f.read(end - start)

    def __getitem__(self, i: int):
        raw = self.read(i)
        try:
            return json.loads(raw)
        except ValueError as e:  # UnicodeDecodeError or JSONDecodeError: the file changed after it was indexed
            raise DataFileError(f"{_where(self.path, i, int(self.offsets[i][0]))}: cannot be parsed ({e}); was the "
                                "file changed in place after it was indexed?") from None
