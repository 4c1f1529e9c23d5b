"""Results files are strict JSON: an undefined value (NaN, ±inf) is null, with its count and place recorded under
``undefined_values`` so that iclgd reads the file back unchanged."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iclgd.core.errors import IclgdError
from iclgd.core.io import atomic_write_json, read_json, read_result, restore, to_json

values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
    max_leaves=20)


def _strict_loads(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=3).filter(lambda k: k != "undefined_values"), values, max_size=5))
def test_any_document_is_written_strict_and_read_back_unchanged(doc):
    text = to_json(doc)
    strict = _strict_loads(text)
    n = sum(1 for _ in _non_finite(doc))
    assert strict.get("undefined_values", {"count": 0})["count"] == n
    assert _same(restore(strict), doc)


def _non_finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _non_finite(x)
    elif isinstance(v, list):
        for x in v:
            yield from _non_finite(x)


def test_an_undefined_figure_is_null_on_disk_and_nan_in_iclgd(tmp_path):
    doc = {"kind": "iclgd.compare", "seeds": [{"rec2ftp": {"value": float("nan"), "denominator": 0}}]}
    atomic_write_json(tmp_path / "results.json", doc)
    on_disk = _strict_loads((tmp_path / "results.json").read_text())
    assert on_disk["seeds"][0]["rec2ftp"]["value"] is None
    assert on_disk["undefined_values"] == {"count": 1, "paths": [["seeds", 0, "rec2ftp", "value"]], "values": ["NaN"]}
    for back in (read_json(tmp_path / "results.json"), read_result(tmp_path / "results.json")):
        assert math.isnan(back["seeds"][0]["rec2ftp"]["value"]) and "undefined_values" not in back


def test_a_hand_edited_record_of_undefined_values_is_a_one_line_error(tmp_path):
    p = tmp_path / "results.json"
    p.write_text(json.dumps({"kind": "x", "a": [None], "undefined_values": {"count": 1, "paths": [["a", 3]],
                                                                           "values": ["NaN"]}}))
    with pytest.raises(IclgdError, match=r"results.json: its undefined_values do not match the document"):
        read_result(p)
