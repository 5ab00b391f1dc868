"""Data loading: real files, their malformed rows, and every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_mtl.data.loading import DataError, encode_split, length_grouped_batches, load_split, collate
from peft_mtl.data.tasks import get_task

from .conftest import real_data_dir

HEADER_SST = "\tid\tsentence\tsentiment\n"
HEADER_QQP = "\tid\tsentence1\tsentence2\tis_duplicate\n"


def write(tmp_path: Path, text: str | bytes, name: str = "f.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_real_sst_train_loads_every_row():
    split = load_split(real_data_dir() / "ids-sst-train.csv", get_task("sst"))
    assert len(split.examples) == 8544 and not split.skipped
    assert {e.label for e in split.examples} == {0.0, 1.0, 2.0, 3.0, 4.0}


@pytest.mark.parametrize("name, rows, line", [("quora-train.csv", 16213, 2059), ("quora-dev.csv", 1999, 1433)])
def test_real_quora_malformed_row_is_skipped_and_reported(name, rows, line):
    split = load_split(real_data_dir() / name, get_task("qqp"))
    assert len(split.examples) == rows
    assert [ln for ln, _ in split.skipped] == [line]
    report = split.skip_report()
    assert report.startswith(f"{name}: skipped 1 malformed row") and f"line {line}" in report


def test_quoted_fields_are_unquoted_like_csv():
    split = load_split(real_data_dir() / "sts-train.csv", get_task("sts"))
    assert len(split.examples) == 6040
    assert not any(e.texts[0].startswith('"""') for e in split.examples)


def test_bad_rows_are_skipped_with_reasons(tmp_path):
    path = write(tmp_path, HEADER_SST + "0\ta\tgood\t3\n1\tb\t\t2\n2\tc\tlabel high\t7\n3\td\tword\tfoo\n"
                 "4\te\thalf\t2.5\n5\tf\textra\t1\tfield\n")
    split = load_split(path, get_task("sst"))
    assert [e.texts for e in split.examples] == [("good",)]
    reasons = dict(split.skipped)
    assert reasons[3] == "empty sentence"
    assert "outside" in reasons[4] and "non-numeric" in reasons[5]
    assert "non-integer" in reasons[6] and "fields" in reasons[7]


def test_strict_turns_a_skip_into_an_error_naming_file_and_line(tmp_path):
    path = write(tmp_path, HEADER_SST + "0\ta\tgood\t3\n1\tb\tbad\t9\n")
    with pytest.raises(DataError, match=r"f\.csv: line 3: label 9"):
        load_split(path, get_task("sst"), strict=True)


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    (",id,sentence,sentiment\n0,a,b,1\n", "not tab-separated"),
    ("\tid\ttext\tlabel\n0\ta\tb\t1\n", "missing column"),
])
def test_unusable_files_raise_one_clear_error(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        load_split(write(tmp_path, content), get_task("sst"))


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_split(tmp_path / "nope.csv", get_task("sst"))


def test_non_utf8_rows_are_skipped_not_crashed(tmp_path):
    raw = HEADER_SST.encode() + b"0\ta\tgood\t1\n1\tb\tbad \xff\xfe bytes\t2\n"
    split = load_split(write(tmp_path, raw), get_task("sst"))
    assert len(split.examples) == 1 and "UTF-8" in split.skipped[0][1]


def test_long_inputs_are_truncated_and_counted(tmp_path, tiny_backbone):
    from peft_mtl.model.backbone import load_tokenizer

    path = write(tmp_path, HEADER_SST + "0\ta\t" + "word " * 300 + "\t1\n1\tb\tshort\t2\n")
    encoded = encode_split(load_split(path, get_task("sst")), load_tokenizer(tiny_backbone), max_length=32)
    assert encoded.truncated == 1
    assert max(encoded.lengths) == 32


def test_pairs_are_cross_encoded_with_segment_ids(tiny_backbone, tmp_path):
    from peft_mtl.model.backbone import load_tokenizer

    tok = load_tokenizer(tiny_backbone)
    path = write(tmp_path, HEADER_QQP + "0\ta\thello there\tgood bye\t1.0\n")
    enc = encode_split(load_split(path, get_task("qqp")), tok)
    seq = enc.segments[0][0]
    assert tok.convert_ids_to_tokens(seq["input_ids"]) == ["[CLS]", "hello", "there", "[SEP]", "good", "bye", "[SEP]"]
    assert seq["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    bi = encode_split(load_split(path, get_task("qqp")), tok, pair_encoding="bi")
    assert len(bi.segments) == 2 and bi.segments[1][0]["token_type_ids"] == [0, 0, 0, 0]


def test_batches_cover_every_example_once_and_pad_dynamically(tiny_backbone):
    lengths = np.array([5, 30, 7, 12, 3, 25, 9, 14, 2, 40])
    rng = np.random.default_rng(0)
    batches = length_grouped_batches(lengths, 3, rng)
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    eval_batches = length_grouped_batches(lengths, 3, None)
    assert all(np.all(np.diff(lengths[b]) >= 0) for b in eval_batches)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_random_bytes_only_ever_raise_data_error(tmp_path, blob):
    path = write(tmp_path, blob, "fuzz.csv")
    try:
        split = load_split(path, get_task("qqp"))
    except DataError:
        return
    assert all(e.label in (0.0, 1.0) for e in split.examples)


cells = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(cells, min_size=0, max_size=6), max_size=8))
def test_random_rows_never_produce_an_invalid_label(tmp_path, rows):
    body = "".join("\t".join(r) + "\n" for r in rows)
    path = write(tmp_path, HEADER_SST + body, "rows.csv")
    try:
        split = load_split(path, get_task("sst"))
    except DataError:
        return
    for e in split.examples:
        assert e.label in {0.0, 1.0, 2.0, 3.0, 4.0} and all(t for t in e.texts)
