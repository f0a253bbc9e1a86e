"""GB 11643-1999 identity numbers, ISO/IEC 7812-1 Luhn PANs and synthetic identities."""

from __future__ import annotations

import random
from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from card.identity import (
    SFZ_CHECK_CHARS,
    TEST_BIN,
    birth_date_of,
    gb11643_check_digit,
    is_valid_gb11643,
    is_valid_luhn,
    luhn_check_digit,
    sex_of,
    synthetic_name,
    synthetic_name_with_pinyin,
    synthetic_pan,
    synthetic_sfz,
)

# The worked examples printed in GB 11643-1999 itself.
STANDARD_EXAMPLES = ["11010519491231002X", "440524188001010014"]


@pytest.mark.parametrize("sfz", STANDARD_EXAMPLES)
def test_standard_examples_check_digit_and_validity(sfz: str) -> None:
    assert gb11643_check_digit(sfz[:17]) == sfz[17]
    assert is_valid_gb11643(sfz)


def test_standard_example_fields() -> None:
    assert birth_date_of("11010519491231002X") == date(1949, 12, 31)
    assert sex_of("11010519491231002X") == "F"  # 17th digit 2
    assert sex_of("440524188001010014") == "M"  # 17th digit 1


def test_check_char_table_covers_all_remainders() -> None:
    assert len(SFZ_CHECK_CHARS) == 11 and set(SFZ_CHECK_CHARS) == set("0123456789X")


@pytest.mark.parametrize("bad", [
    "11010519491231002x",        # lower-case x is not the standard's check character
    "110105194912310021",        # wrong check digit
    "11010519490230002X"[:17],   # too short
    "1101051949123100200",       # too long
    "99010519491231002X",        # no such province
    "110105194902300021",        # 30 February
    "110105187001010013",        # before 1880
    "11010519491231A02X",        # letter in the body
    "",
    None,
    11010519491231002,
])
def test_invalid_numbers_are_refused(bad: object) -> None:
    assert not is_valid_gb11643(bad)


def test_wrong_check_digits_all_refused() -> None:
    body = "11010519491231002"
    for c in "0123456789X":
        assert is_valid_gb11643(body + c) == (c == "X")


def test_future_birth_date_refused_only_when_today_given() -> None:
    body = "33030220300101001"
    sfz = body + gb11643_check_digit(body)
    assert is_valid_gb11643(sfz)
    assert not is_valid_gb11643(sfz, today=date(2025, 1, 1))
    assert is_valid_gb11643(sfz, today=date(2030, 1, 1))


def test_check_digit_rejects_malformed_body() -> None:
    for bad in ["1234", "1101051949123100A", "１１０１０５１９４９１２３１００２"]:
        with pytest.raises(ValueError):
            gb11643_check_digit(bad)


def test_field_accessors_reject_invalid() -> None:
    with pytest.raises(ValueError):
        sex_of("110105194912310021")
    with pytest.raises(ValueError):
        birth_date_of("not an id")


@given(st.integers(0, 2**32), st.dates(date(1900, 1, 1), date(2099, 12, 31)),
       st.sampled_from([None, "M", "F"]))
def test_synthetic_sfz_is_valid_and_encodes_inputs(seed: int, born: date, sex: str | None) -> None:
    sfz = synthetic_sfz(random.Random(seed), birth_date=born, sex=sex)
    assert is_valid_gb11643(sfz)
    assert sfz.startswith("330302")
    assert birth_date_of(sfz) == born
    assert sfz[14:17] != "000"
    if sex is not None:
        assert sex_of(sfz) == sex


def test_synthetic_sfz_is_deterministic_per_seed_and_defaults_birth_date() -> None:
    a = synthetic_sfz(random.Random(7), region="110105")
    b = synthetic_sfz(random.Random(7), region="110105")
    assert a == b and a.startswith("110105") and is_valid_gb11643(a)
    assert date(1940, 1, 1) <= birth_date_of(a) <= date(2010, 12, 31)


@pytest.mark.parametrize("kwargs", [{"region": "99"}, {"region": "990000"}, {"region": "33030a"},
                                    {"sex": "X"}, {"birth_date": date(1800, 1, 1)}])
def test_synthetic_sfz_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        synthetic_sfz(random.Random(1), **kwargs)


@given(st.text(alphabet="0123456789", min_size=17, max_size=17))
def test_any_body_with_its_check_digit_validates_when_region_and_date_ok(tail: str) -> None:
    body = "330302" + "19900615" + tail[:3]
    assert is_valid_gb11643(body + gb11643_check_digit(body))


# -- Luhn (ISO/IEC 7812-1 Annex B) ---------------------------------------------------------

@pytest.mark.parametrize("pan", ["79927398713", "4111111111111111",
                                 "5555555555554444", "00"])
def test_known_valid_luhn_numbers(pan: str) -> None:
    assert is_valid_luhn(pan)
    assert luhn_check_digit(pan[:-1]) == pan[-1]


@pytest.mark.parametrize("bad", ["79927398710", "4111111111111112", "7", "", "4111 1111", None,
                                 "٤١١١١١١١١١١١١١١١"])
def test_invalid_luhn_numbers(bad: object) -> None:
    assert not is_valid_luhn(bad)


def test_luhn_check_digit_rejects_non_digits() -> None:
    for bad in ["", "12a4", "１２"]:
        with pytest.raises(ValueError):
            luhn_check_digit(bad)


@given(st.integers(0, 2**32), st.integers(12, 19))
def test_synthetic_pan(seed: int, length: int) -> None:
    pan = synthetic_pan(random.Random(seed), length=length)
    assert len(pan) == length and pan.startswith(TEST_BIN) and is_valid_luhn(pan)


@given(st.integers(0, 2**32), st.data())
def test_luhn_detects_every_single_digit_error(seed: int, data: st.DataObject) -> None:
    pan = synthetic_pan(random.Random(seed))
    pos = data.draw(st.integers(0, len(pan) - 1))
    new = data.draw(st.sampled_from([d for d in "0123456789" if d != pan[pos]]))
    assert not is_valid_luhn(pan[:pos] + new + pan[pos + 1:])


def test_synthetic_pan_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        synthetic_pan(random.Random(1), length=20)
    with pytest.raises(ValueError):
        synthetic_pan(random.Random(1), bin_prefix="99x933")
    with pytest.raises(ValueError):
        synthetic_pan(random.Random(1), bin_prefix="9" * 12, length=12)


# -- names ------------------------------------------------------------------------------------

@given(st.integers(0, 2**32))
def test_synthetic_names(seed: int) -> None:
    hanzi, pinyin = synthetic_name_with_pinyin(random.Random(seed))
    assert 2 <= len(hanzi) <= 4
    assert all("\u4e00" <= ch <= "\u9fff" for ch in hanzi)
    hanzi.encode("gbk")  # storable on the card (EF06 is GBK)
    assert pinyin.isascii() and pinyin.isupper() and pinyin.count("/") == 1
    assert 2 <= len(pinyin) <= 26
    assert synthetic_name(random.Random(seed)) == hanzi
