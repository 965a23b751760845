"""Layer ranges: half-open values, parsed from what users type, checked against the model."""

import pytest

from exo_rknpu.errors import LayerRangeError
from exo_rknpu.model.base import LayerRange, parse_split


def test_parse_inclusive_user_syntax_into_half_open_range():
    r = LayerRange.parse("4-7", 30)
    assert (r.start, r.stop, len(r), str(r)) == (4, 8, 4, "4-7")
    assert not r.is_first and not r.is_last


def test_single_layer_and_ends():
    assert LayerRange.parse("0", 30).is_first
    assert LayerRange.parse("29", 30).is_last
    assert LayerRange.full(30).is_first and LayerRange.full(30).is_last


@pytest.mark.parametrize("text", ["5-3", "0-30", "-1", "a-b", "30"])
def test_bad_ranges_say_what_is_valid(text):
    with pytest.raises(LayerRangeError, match="0-29|A-B|before the start"):
        LayerRange.parse(text, 30)


def test_split_must_cover_the_model_consecutively():
    assert [str(r) for r in parse_split("0-9,10-19,20-29", 30)] == ["0-9", "10-19", "20-29"]
    with pytest.raises(LayerRangeError, match="should start at layer 10"):
        parse_split("0-9,11-29", 30)
    with pytest.raises(LayerRangeError, match="stops at layer 19"):
        parse_split("0-9,10-19", 30)
