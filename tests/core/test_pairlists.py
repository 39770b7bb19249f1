"""Pair-list parsing: whole-list errors raise, bad rows are kept with an error."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.pairlists import (
    NO_LABEL,
    PairListError,
    is_pair_list,
    iter_pair_chunks,
    list_stem,
    validate_pair_list,
)


def _rows(path, fmt, chunk_rows=1000):
    out = []
    for chunk in iter_pair_chunks(path, fmt, chunk_rows=chunk_rows):
        for i in range(len(chunk)):
            out.append(
                (
                    int(chunk.row_index[i]),
                    chunk.pair_id[i],
                    chunk.image_a[i],
                    chunk.image_b[i],
                    int(chunk.label[i]),
                    chunk.error[i],
                )
            )
    return out


def test_csv_rows_and_every_kind_of_bad_row(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text(
        "\ufeffpair_id,image_a,image_b,label\n"
        "p1,images/a.jpg,images/b.jpg,1\n"
        ",images/a.jpg,images/c.jpg,0\n"  # default pair id = row index
        "p3,,images/c.jpg,1\n"  # empty image_a
        "p4,images/a.jpg,images/b.jpg,7\n"  # bad label
        "p1,images/a.jpg,images/b.jpg,1\n"  # duplicate pair id
        "p6,images/a.jpg\n"  # ragged line
        "\n"
        "p7,images/a.jpg,images/b.jpg,\n"  # empty label -> unlabelled row
        "8,images/a.jpg,images/b.jpg,1\n"  # explicit id equal to the next row's number
        ",images/a.jpg,images/c.jpg,0\n",  # blank: its default "8" is taken
        encoding="utf-8",
    )
    rows = _rows(path, "csv")
    assert [r[0] for r in rows] == list(range(9))
    assert rows[0] == (0, "p1", "images/a.jpg", "images/b.jpg", 1, "")
    assert rows[1][1] == "1" and rows[1][5] == ""
    assert "image_a is empty" in rows[2][5]
    assert "label must be 0 or 1" in rows[3][5]
    assert "duplicate pair_id" in rows[4][5]
    assert "expected 4 fields, got 2" in rows[5][5]
    assert rows[6][4] == NO_LABEL and rows[6][5] == ""
    assert rows[7][1] == "8" and rows[7][5] == ""
    assert rows[8][1] == "8" and "pair_id is blank and its default" in rows[8][5]
    report = validate_pair_list(path)
    assert (report.rows, report.invalid_rows, report.labelled) == (9, 5, True)


def test_an_explicit_id_equal_to_an_earlier_blank_rows_default_says_so(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("pair_id,image_a,image_b\n,a.jpg,b.jpg\n0,c.jpg,d.jpg\n")
    rows = _rows(path, "csv")
    assert rows[0][1] == "0" and rows[0][5] == ""
    assert "'0' is already the default id of row 0, whose pair_id is blank" in rows[1][5]


def test_chunks_are_bounded(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("image_a,image_b\n" + "images/a.jpg,images/b.jpg\n" * 2500)
    sizes = [len(c) for c in iter_pair_chunks(path, "csv", chunk_rows=1000)]
    assert sizes == [1000, 1000, 500]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"foo,bar\n1,2\n", "missing required column"),
        (b"image_a,image_b\n\xff\xfe\xfa,x\n", "not UTF-8"),
        (
            b'image_a,image_b\na,b\n"unterminated,x\nc,d\n',
            "opened at line 3 is not closed on its line",
        ),
        (b"image_a,image_b\n", "header but no rows"),
        (b"image_a,image_b\n\n  \n", "header but no rows"),
        # the bad byte follows the header (16 bytes), 9,000 rows of 12 and the "c"
        (
            b"image_a,image_b\n" + b"a.jpg,b.jpg\n" * 9000 + b"c\xff,d\n",
            f"byte {16 + 9000 * 12 + 1}, line 9002",
        ),
    ],
)
def test_unparseable_csv_raises(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(PairListError, match=message):
        list(iter_pair_chunks(path, "csv"))


def test_a_line_with_broken_quoting_is_one_invalid_row(tmp_path):
    path = tmp_path / "quotes.csv"
    path.write_bytes(b'pair_id,image_a,image_b\nx,a.jpg,b.jpg\ny,"c.jpg"z,d.jpg\nw,e.jpg,f.jpg\n')
    rows = _rows(path, "csv")
    assert [(r[1], r[2], r[3]) for r in rows] == [
        ("x", "a.jpg", "b.jpg"),
        ("line-3", "", ""),  # its own id is unknown
        ("w", "e.jpg", "f.jpg"),
    ]
    assert rows[1][5].startswith("malformed CSV at line 3:") and "empty" not in rows[1][5]
    assert rows[0][5] == rows[2][5] == ""


def test_a_quote_left_open_rejects_the_list_rather_than_swallow_rows(tmp_path):
    """The open quote runs into later lines until another quote ends it: those rows
    would vanish from the results, so the whole list is rejected, naming the line."""
    path = tmp_path / "open.csv"
    path.write_bytes(b'pair_id,image_a,image_b\np1,"a.jpg,b.jpg\np2,c,d\np3,"e.jpg",f\np4,g,h\n')
    with pytest.raises(PairListError, match="opened at line 2 is not closed on its line"):
        list(iter_pair_chunks(path, "csv"))


def test_parquet_pair_ids_written_by_pandas_keep_their_integer_spelling(tmp_path):
    """An integer column with gaps is stored as float64: 1.0 is id "1", NaN is blank."""
    path = tmp_path / "ids.parquet"
    table = pa.table(
        {
            "pair_id": pa.array([1.0, None, 3.0, float("nan"), 2.5]),
            "image_a": ["a.jpg"] * 5,
            "image_b": ["b.jpg"] * 5,
        }
    )
    pq.write_table(table, path)
    rows = _rows(path, "parquet")
    assert [r[1] for r in rows] == ["1", "1", "3", "3", "2.5"]
    # the blanks default to their row numbers, which the explicit ids already use
    assert [bool(r[5]) for r in rows] == [False, True, False, True, False]
    assert "row number 1, is already used" in rows[1][5]


def test_parquet_lists(tmp_path):
    path = tmp_path / "l.parquet"
    table = pa.table(
        {
            "image_a": ["images/a.jpg", None, "images/a.jpg"],
            "image_b": ["images/b.jpg", "images/b.jpg", "images/b.jpg"],
            "label": pa.array([1, 0, 3], pa.int64()),
            "extra": [1, 2, 3],
        }
    )
    pq.write_table(table, path, row_group_size=2)
    rows = _rows(path, "parquet", chunk_rows=2)
    assert [r[4] for r in rows] == [1, 0, NO_LABEL]
    assert rows[0][5] == "" and "image_a is empty" in rows[1][5] and "label" in rows[2][5]
    bad = tmp_path / "junk.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(PairListError, match="not a readable Parquet"):
        list(iter_pair_chunks(bad, "parquet"))
    bom = tmp_path / "bom.parquet"  # a header cell exported with a byte-order mark
    pq.write_table(pa.table({"\ufeffimage_a": ["images/a.jpg"], " image_b": ["b.jpg"]}), bom)
    assert [r[2:4] for r in _rows(bom, "parquet")] == [("images/a.jpg", "b.jpg")]
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"a": [1]}), nocol)
    with pytest.raises(PairListError, match="missing required"):
        list(iter_pair_chunks(nocol, "parquet"))


def test_names():
    assert list_stem("incoming/team/night_1.csv") == "team/night_1"
    assert list_stem("incoming/night_1.csv") == "night_1"
    assert list_stem("incoming/x.PARQUET") == "x"
    assert is_pair_list("incoming/a.csv") and not is_pair_list("incoming/a.jpg")
    assert not is_pair_list("incoming/.tmp.csv")
    assert np.int8(NO_LABEL) == -1
