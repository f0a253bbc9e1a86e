"""Identity numbers: GB 11643-1999 citizen identity numbers and ISO/IEC 7812-1 (Luhn) PANs.

Everything here is pure: no clock, no I/O; randomness comes from the ``rng`` argument.

The ``synthetic_*`` generators make test data only. Their output is drawn from ``rng`` and is not
derived from any real person's data; a synthetic identity number may by chance equal a real one,
so it must never leave tests, demos and simulators. Synthetic PANs use the BIN ``999933``
(major industry identifier 9, national use), which no payment scheme issues.
"""

from __future__ import annotations

import random
from datetime import date, timedelta

__all__ = [
    "SFZ_WEIGHTS",
    "SFZ_CHECK_CHARS",
    "PROVINCE_CODES",
    "TEST_BIN",
    "gb11643_check_digit",
    "is_valid_gb11643",
    "synthetic_sfz",
    "sex_of",
    "birth_date_of",
    "luhn_check_digit",
    "is_valid_luhn",
    "synthetic_pan",
    "synthetic_name",
    "synthetic_name_with_pinyin",
]

#: ISO 7064 MOD 11-2 weights of the 17 body digits (2^(17-i) mod 11), GB 11643-1999 section 7.
SFZ_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
#: Check character indexed by (weighted sum mod 11).
SFZ_CHECK_CHARS = "10X98765432"
#: Province-level prefixes of GB/T 2260 region codes (first two digits), including 71 Taiwan and
#: 81/82/83 used by residence permits of Hong Kong, Macao and Taiwan residents.
PROVINCE_CODES = frozenset({
    "11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37",
    "41", "42", "43", "44", "45", "46", "50", "51", "52", "53", "54", "61", "62", "63", "64",
    "65", "71", "81", "82", "83",
})
#: Earliest birth year accepted by :func:`is_valid_gb11643`.
SFZ_BIRTH_YEAR_MIN = 1880
#: Issuer identification number used for synthetic PANs: MII 9 (national use), never issued.
TEST_BIN = "999933"

_DIGITS = frozenset("0123456789")


def gb11643_check_digit(first17: str) -> str:
    """Check character of a GB 11643-1999 citizen identity number.

    ``first17`` is the 17-digit body (6 region + 8 birth date + 3 sequence). Returns one of
    ``"0".."9"`` or ``"X"`` (ISO 7064 MOD 11-2). Raises ``ValueError`` if the body is not exactly
    17 ASCII digits.
    """
    if not isinstance(first17, str) or len(first17) != 17 or not set(first17) <= _DIGITS:
        raise ValueError("GB 11643 body must be exactly 17 ASCII digits")
    total = sum(int(c) * w for c, w in zip(first17, SFZ_WEIGHTS))
    return SFZ_CHECK_CHARS[total % 11]


def _birth_date(sfz: str) -> date | None:
    try:
        born = date(int(sfz[6:10]), int(sfz[10:12]), int(sfz[12:14]))
    except ValueError:
        return None
    return born if born.year >= SFZ_BIRTH_YEAR_MIN else None


def is_valid_gb11643(s: object, *, today: date | None = None) -> bool:
    """True when ``s`` is a well-formed 18-character GB 11643-1999 citizen identity number.

    Checks: 17 ASCII digits then a digit or upper-case ``X``; a 6-digit region code whose
    province prefix is in :data:`PROVINCE_CODES` (GB/T 2260); a real calendar birth date
    ``yyyymmdd`` from :data:`SFZ_BIRTH_YEAR_MIN` on (and not after ``today`` when given: this
    function reads no clock); and the MOD 11-2 check character. Never raises.
    """
    if not isinstance(s, str) or len(s) != 18:
        return False
    body, check = s[:17], s[17]
    if not set(body) <= _DIGITS or (check not in _DIGITS and check != "X"):
        return False
    if body[:2] not in PROVINCE_CODES:
        return False
    born = _birth_date(s)
    if born is None or (today is not None and born > today):
        return False
    return gb11643_check_digit(body) == check


def _require_sfz(sfz: str) -> None:
    if not is_valid_gb11643(sfz):
        raise ValueError("not a valid GB 11643 citizen identity number")


def synthetic_sfz(rng: random.Random, region: str = "330302", birth_date: date | None = None,
                  *, sex: str | None = None) -> str:
    """A synthetic, valid GB 11643 identity number for tests (18 characters).

    ``region`` is a 6-digit GB/T 2260 code (default 330302, Lucheng district of Wenzhou);
    ``birth_date`` defaults to a date drawn from ``rng`` between 1940-01-01 and 2010-12-31;
    ``sex`` ``"M"`` or ``"F"`` fixes the parity of the sequence code, else ``rng`` picks it.
    The 3-digit sequence code comes from ``rng``. Raises ``ValueError`` for a bad region, sex or
    a birth date before :data:`SFZ_BIRTH_YEAR_MIN`.
    """
    if len(region) != 6 or not set(region) <= _DIGITS or region[:2] not in PROVINCE_CODES:
        raise ValueError(f"region {region!r} is not a 6-digit GB/T 2260 code")
    if birth_date is None:
        start = date(1940, 1, 1)
        birth_date = start + timedelta(days=rng.randrange((date(2010, 12, 31) - start).days + 1))
    if birth_date.year < SFZ_BIRTH_YEAR_MIN or birth_date.year > 9999:
        raise ValueError(f"birth date {birth_date} is out of range")
    if sex not in (None, "M", "F"):
        raise ValueError("sex must be 'M', 'F' or None")
    first_two = rng.randrange(100)
    if sex is None:
        last = rng.randrange(10)
    else:
        last = rng.randrange(5) * 2 + (1 if sex == "M" else 0)
    seq = first_two * 10 + last
    if seq == 0:  # sequence 000 is not assigned; 002 keeps the (female) parity
        seq = 2
    body = f"{region}{birth_date:%Y%m%d}{seq:03d}"
    return body + gb11643_check_digit(body)


def sex_of(sfz: str) -> str:
    """Sex encoded in a GB 11643 number: ``"M"`` when the 17th digit is odd, else ``"F"``.

    Raises ``ValueError`` when ``sfz`` is not a valid identity number.
    """
    _require_sfz(sfz)
    return "M" if int(sfz[16]) % 2 == 1 else "F"


def birth_date_of(sfz: str) -> date:
    """Birth date encoded in characters 7-14 (``yyyymmdd``) of a GB 11643 number.

    Raises ``ValueError`` when ``sfz`` is not a valid identity number.
    """
    _require_sfz(sfz)
    born = _birth_date(sfz)
    assert born is not None
    return born


def luhn_check_digit(payload: str) -> str:
    """ISO/IEC 7812-1 Annex B (Luhn, mod 10) check digit of ``payload`` (the PAN without it).

    ``payload`` is a non-empty string of ASCII digits; returns a single digit. Raises
    ``ValueError`` otherwise.
    """
    if not isinstance(payload, str) or not payload or not set(payload) <= _DIGITS:
        raise ValueError("Luhn payload must be a non-empty string of ASCII digits")
    total = 0
    for i, c in enumerate(reversed(payload)):
        d = int(c)
        if i % 2 == 0:  # rightmost payload digit is doubled
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def is_valid_luhn(pan: object) -> bool:
    """True when ``pan`` is 2+ ASCII digits whose last digit is the Luhn check digit (ISO/IEC 7812-1).

    Length rules of a PAN (12..19 digits) are not checked here. Never raises.
    """
    if not isinstance(pan, str) or len(pan) < 2 or not set(pan) <= _DIGITS:
        return False
    return luhn_check_digit(pan[:-1]) == pan[-1]


def synthetic_pan(rng: random.Random, bin_prefix: str = TEST_BIN, length: int = 19) -> str:
    """A synthetic PAN (ISO/IEC 7812-1): ``bin_prefix``, digits from ``rng``, Luhn check digit.

    ``length`` is the total number of digits, 12..19 (default 19 as for UnionPay debit cards).
    Raises ``ValueError`` for a non-digit prefix or when the prefix leaves no room.
    """
    if not 12 <= length <= 19:
        raise ValueError("a PAN has 12 to 19 digits")
    if not bin_prefix or not set(bin_prefix) <= _DIGITS or len(bin_prefix) >= length:
        raise ValueError("bin_prefix must be digits, shorter than the PAN")
    body = bin_prefix + "".join(str(rng.randrange(10)) for _ in range(length - 1 - len(bin_prefix)))
    return body + luhn_check_digit(body)


# Small lists of common surnames and given-name characters (hanzi, pinyin).
_SURNAMES = (
    ("王", "WANG"), ("李", "LI"), ("张", "ZHANG"), ("刘", "LIU"), ("陈", "CHEN"), ("杨", "YANG"),
    ("黄", "HUANG"), ("赵", "ZHAO"), ("吴", "WU"), ("周", "ZHOU"), ("徐", "XU"), ("孙", "SUN"),
    ("胡", "HU"), ("朱", "ZHU"), ("林", "LIN"), ("郑", "ZHENG"), ("潘", "PAN"), ("叶", "YE"),
    ("金", "JIN"), ("谢", "XIE"), ("欧阳", "OUYANG"),
)
_GIVEN = (
    ("伟", "WEI"), ("芳", "FANG"), ("娜", "NA"), ("敏", "MIN"), ("静", "JING"), ("丽", "LI"),
    ("强", "QIANG"), ("磊", "LEI"), ("军", "JUN"), ("洋", "YANG"), ("勇", "YONG"), ("艳", "YAN"),
    ("杰", "JIE"), ("娟", "JUAN"), ("涛", "TAO"), ("明", "MING"), ("超", "CHAO"), ("秀", "XIU"),
    ("英", "YING"), ("华", "HUA"), ("建", "JIAN"), ("国", "GUO"), ("平", "PING"), ("文", "WEN"),
    ("海", "HAI"), ("晨", "CHEN"), ("宇", "YU"), ("欣", "XIN"), ("怡", "YI"), ("浩", "HAO"),
)


def synthetic_name_with_pinyin(rng: random.Random) -> tuple[str, str]:
    """A plausible synthetic Chinese name and its upper-case pinyin, e.g. ``("张伟", "ZHANG/WEI")``.

    The pinyin form ``SURNAME/GIVEN`` is the ASCII cardholder-name format of EMV tag 5F20.
    One or two given-name characters, drawn from ``rng``.
    """
    surname, surname_py = rng.choice(_SURNAMES)
    given = [rng.choice(_GIVEN) for _ in range(rng.choice((1, 2)))]
    return surname + "".join(h for h, _ in given), f"{surname_py}/" + "".join(p for _, p in given)


def synthetic_name(rng: random.Random) -> str:
    """A plausible synthetic Chinese name in hanzi (2-4 characters), drawn from ``rng``."""
    return synthetic_name_with_pinyin(rng)[0]
