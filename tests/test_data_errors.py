"""Unreadable data files: one exception type (DataFileError, a ValueError) whose message names the file and the record
index and / or byte offset, whatever the damage and wherever the index's read blocks fall."""
from __future__ import annotations

import json

import pytest

import data.json_index as json_index
from data import DataFileError, JsonListIndex, LLaVADataset, load_tokenizer, make_demo_tokenizer

GOOD = {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]}
PREFIX = ("[" + json.dumps(GOOD) + ", ").encode()  # record 0, then record 1 starts at byte len(PREFIX)
R1 = len(PREFIX)

# file bytes -> (record or None, byte offset, what the message says)
CASES = {
    "latin1": (PREFIX + '{"id": "café"}]'.encode("latin-1"), 1, R1 + 11, r"not UTF-8 text \(bytes b'\\xe9'"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00", 0, 0, "not UTF-8 text"),
    "cut_utf8": (PREFIX + '{"id": "é'.encode()[:-1], 1, R1 + 8, "not UTF-8 text .*unexpected end of data"),
    "utf16": ("[1, 2]".encode("utf-16"), 0, 0, "not UTF-8 text"),
    "object": (b'{"id": 1, "conversations": []}', None, 0, "not a JSON list of LLaVA records: found a JSON object"),
    "empty": (b"", None, 0, "not a JSON list.*found an empty file"),
    "text": (b"  id,image\n1,a.png\n", None, 2, "not a JSON list.*found 'i' where the list's '\\[' should be"),
    "bad_json": (PREFIX + b'{"id": 2,}]', 1, R1 + 9, "invalid JSON: Expecting property name"),
    "no_comma": (PREFIX + b'{"id": 2} {"id": 3}]', 2, R1 + 10, r"expected ',' or '\]' after record 1, found '\{'"),
    "cut": (PREFIX + b'{"id": 2, "conv', 1, R1 + 10,
            r"invalid JSON: Unterminated string starting here \(the file ends inside"),
    "no_end": (PREFIX + b'{"id": 2}\n', 2, R1 + 10, r"expected ',' or '\]' after record 1, found the end of the file"),
    "two_lists": (b"[1]\n[2]", None, 4, r"found '\[' after the list's closing '\]'"),
}


@pytest.mark.parametrize("block", [1 << 20, 1, 7])
@pytest.mark.parametrize("name", list(CASES))
def test_unreadable_file_names_file_record_and_offset(tmp_path, monkeypatch, name, block):
    monkeypatch.setattr(json_index, "_BLOCK", block)  # the same message whichever read block holds the damage
    raw, record, offset, what = CASES[name]
    path = tmp_path / f"{name}.json"
    path.write_bytes(raw)
    where = (f"record {record} / " if record is not None else "") + f"byte offset {offset}"
    with pytest.raises(DataFileError, match=f"^{path}: {where}: {what}"):
        JsonListIndex(path, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npy"))  # nothing cached for a broken file


def test_offset_points_at_the_bad_byte(tmp_path):
    """The byte offset counts bytes, not characters, so `dd skip=K` / a hex editor lands on the damage."""
    raw = ('[{"id": "日本語"}, {"id": "ok"}, {"id": "x' + "\x00" + '"}]').encode().replace(b"\x00", b"\xff")
    (tmp_path / "d.json").write_bytes(raw)
    with pytest.raises(DataFileError) as err:
        JsonListIndex(tmp_path / "d.json", tmp_path)
    offset = int(str(err.value).split("byte offset ")[1].split(":")[0])
    assert raw[offset:offset + 1] == b"\xff" and "record 2 / " in str(err.value)


def test_a_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD, {"id": "é"}], ensure_ascii=False).encode())
    index = JsonListIndex(tmp_path / "bom.json", tmp_path)
    assert [index[i] for i in range(len(index))] == [GOOD, {"id": "é"}]


def test_a_file_changed_after_indexing_names_the_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, {"id": "b"}]))
    index = JsonListIndex(path, tmp_path)
    start = int(index.offsets[1][0])
    path.write_bytes(path.read_bytes()[:start] + b"\xff" + path.read_bytes()[start + 1:])  # same size
    assert index[0] == GOOD
    with pytest.raises(DataFileError, match=f"{path}: record 1 / byte offset {start}: cannot be parsed"):
        index[1]


def test_a_folder_or_unreadable_file_is_a_data_file_error(tmp_path):
    with pytest.raises(DataFileError, match="is a folder"):
        json_index.build_offsets(tmp_path)


def test_the_dataset_raises_it_too(tmp_path):
    tok = load_tokenizer(make_demo_tokenizer(tmp_path / "tok"))
    (tmp_path / "d.json").write_bytes(PREFIX + b"\xfe]")
    with pytest.raises(DataFileError, match=f"d.json: record 1 / byte offset {R1}: not UTF-8"):
        LLaVADataset(tmp_path / "d.json", tmp_path, tok, "v1", "pad", 2048, tmp_path / "cache")
    assert issubclass(DataFileError, ValueError)
