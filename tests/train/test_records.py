"""The one record reader (`mmfast.train.records`) as the evaluators read it: every held-out record file through
`read_rows` (datasets where pyarrow reads the file as written, else the line reader, records unchanged),
CSV through `csv_rows`, errors naming the file and the line or row; and datasets' progress bar as
`--no_progress` asks."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmfast.train import records
from mmfast.train.command import progress_bars
from mmfast.train.records import csv_rows, read_rows

# Records pyarrow reads differently from the file: each must come back exactly as written.
AMBIGUOUS = {
    "missing-key": [{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}],
    "null": [{"image": "a.jpg", "caption": "x"}, {"image": None, "caption": "y"}],
    "type-change": [{"caption": "x"}, {"caption": ["y", "z"]}],
    "int-among-decimals": [{"score": 1}, {"score": 1.5}, {"score": 2}],
    "nested-keys-differ": [{"c": [{"from": "h", "value": "v"}]}, {"c": [{"value": "w"}]}],
    "empty-lists-only": [{"t": []}, {"t": []}],
    "all-null": [{"x": None}, {"x": None}],
}
PLAIN = [
    {"image": "a.jpg", "caption": ["x", "y"], "n": 3, "ok": True, "c": [{"from": "h", "value": "v"}]},
    {"image": "b.jpg", "caption": ["z"], "n": -1, "ok": False, "c": []},
]


def write_jsonl(path, rows, blank_lines=False):
    path.write_text("".join(json.dumps(r) + "\n" + ("\n" if blank_lines else "") for r in rows))
    return path


def as_written(rows) -> str:
    return json.dumps(rows)  # exact: 1 and 1.0 differ, as do a missing key and null


@pytest.mark.parametrize("case", sorted(AMBIGUOUS))
def test_records_pyarrow_reads_differently_come_back_as_written(tmp_path, case):
    path = write_jsonl(tmp_path / f"{case}.jsonl", AMBIGUOUS[case])
    assert records._as_written(path) is None  # the line reader reads it
    assert as_written([r for _, r in read_rows(path)]) == as_written(AMBIGUOUS[case])
    assert [n for n, _ in read_rows(path)] == list(range(len(AMBIGUOUS[case])))


def test_a_plain_file_is_read_through_datasets(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", PLAIN, blank_lines=True)
    table = records._as_written(path)
    assert table is not None and table.num_rows == 2
    assert as_written([r for _, r in read_rows(path)]) == as_written(PLAIN)
    assert [n for n, _ in read_rows(path)] == [0, 1]  # rows count the non-blank lines, as training does
    listed = tmp_path / "plain.json"
    listed.write_text(json.dumps(PLAIN))
    assert records._as_written(listed) is not None
    assert as_written([r for _, r in read_rows(listed)]) == as_written(PLAIN)


def test_parquet_rows_as_stored(tmp_path):
    rows = [{"image": {"bytes": b"\x89PNG", "path": "0.png"}, "text": ["a", "b"]},
            {"image": {"bytes": None, "path": "1.png"}, "text": []}]  # fmt: skip
    path = tmp_path / "hf.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [r for _, r in read_rows(path)] == rows
    path.write_bytes(b"PAR1 garbage")
    with pytest.raises(ValueError, match="hf.parquet: not a readable parquet file"):
        list(read_rows(path))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"a": "x"}\n\n{oops\n', r"bad.jsonl: line 3 is not valid JSON"),
        ("list.jsonl", b'{"a": "x"}\n["a"]\n', r"list.jsonl: line 2 is a list, not an object"),
        ("latin.jsonl", b'{"a": "x"}\n{"a": "caf\xe9"}\n', r"latin.jsonl: line 2 is not UTF-8 text"),
        ("dict.json", b'{"a": ["x"]}', r"dict.json: expected a JSON list of records, got dict"),
        ("ints.json", b"[1]", r"ints.json: record 0 must be an object, got int"),
        ("broken.json", b"[{", r"broken.json: the file is not valid JSON"),
        ("set.csv", b"a,b\n1,2\n", r"set.csv: unknown file type '.csv' \(expected .jsonl, .json, .parquet\)"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        list(read_rows(tmp_path / name))


def test_an_empty_file_has_no_rows(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n \n")
    assert list(read_rows(tmp_path / "empty.jsonl")) == []


def test_csv_rows_give_the_line_each_row_ends_on(tmp_path):
    path = tmp_path / "set.csv"
    path.write_text('sent0,sent1\na,"two\nlines"\nb,c\n')
    assert list(csv_rows(path)) == [(3, 0, {"sent0": "a", "sent1": "two\nlines"}), (4, 1, {"sent0": "b", "sent1": "c"})]
    path.write_text("sent0,sent1\na,b\nc\n")
    with pytest.raises(ValueError, match=r"set.csv: row 1 does not have the header's 2 fields \(line 3\)"):
        list(csv_rows(path))


@pytest.fixture
def datasets_bars_on():
    """datasets' bars on for the test, the process's setting restored after it."""
    was_on = datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    yield
    (datasets.enable_progress_bars if was_on else datasets.disable_progress_bars)()


def test_progress_bars_off_silences_datasets_conversion_and_restores_it(tmp_path, capfd, datasets_bars_on):
    first = write_jsonl(tmp_path / "first.jsonl", PLAIN)
    with progress_bars(False):
        assert list(read_rows(first))
        assert not datasets.is_progress_bar_enabled()
    assert "Generating train split" not in capfd.readouterr().err
    assert datasets.is_progress_bar_enabled()  # restored for the rest of the process
    second = write_jsonl(tmp_path / "second.jsonl", PLAIN[::-1])
    with progress_bars(True):
        assert list(read_rows(second))
    assert "Generating train split" in capfd.readouterr().err  # the bar the first block hid


def test_progress_bars_keep_a_caller_s_own_choice(datasets_bars_on):
    datasets.disable_progress_bars()
    for enabled in (False, True):
        with progress_bars(enabled):
            assert not datasets.is_progress_bar_enabled()
        assert not datasets.is_progress_bar_enabled()
