"""Money as integer minor units (fen), and the only places where decimals touch it.

Rules (DESIGN.md, "Money"):

* amounts inside the system are ``int`` minor units of one ISO 4217 currency (CNY, exponent 2);
* decimal strings ("497.01" yuan) are parsed only at the edges, with :func:`parse_yuan`;
* rounding is half-up (away from zero for positive amounts) to the fen; Python's ``round`` is
  half-even and must never be used on money;
* a split of a whole into parts always sums exactly to the whole (:func:`allocate`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

CURRENCY_EXPONENTS = {"CNY": 2}
FEN_PER_YUAN = 100
#: Largest amount the system accepts in one field: 10^15 fen (10 trillion yuan), well inside
#: a signed 64-bit BIGINT, so that sums of many amounts cannot overflow the database column.
AMOUNT_FEN_MAX = 10**15


class MoneyError(ValueError):
    """A monetary value is malformed, out of range or mixes currencies."""


#: A decimal number as NHSA files and our API write it: ASCII digits, an optional sign and
#: decimal point, nothing else (no exponent, digit separator, other scripts' digits, or
#: whitespace inside; surrounding whitespace is tolerated). Python's ``Decimal()`` alone would
#: take "1_000", "١٢" or "1e3".
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)


def to_decimal(text: str | int | Decimal, *, field: str = "value") -> Decimal:
    """Parse a decimal string (``[+-]digits[.digits]``, ASCII; see :data:`_DECIMAL_TEXT`) or an
    int/Decimal exactly; never accepts float.

    Raises :class:`MoneyError` naming ``field`` when the text is not a finite decimal number in
    that form.
    """
    if isinstance(text, bool) or isinstance(text, float):
        raise MoneyError(f"{field}: binary floats are not accepted for money, give a decimal string")
    if isinstance(text, Decimal):
        value = text
    elif isinstance(text, int):
        value = Decimal(text)
    elif isinstance(text, str):
        stripped = text.strip()
        if len(stripped) > 64 or not _DECIMAL_TEXT.fullmatch(stripped):
            raise MoneyError(f"{field}: {text[:70]!r} is not a decimal number: write a plain decimal (digits "
                             "0-9, an optional sign and decimal point)")
        try:
            value = Decimal(stripped)
        except InvalidOperation:  # pragma: no cover - the pattern admits only valid numbers
            raise MoneyError(f"{field}: {text!r} is not a decimal number") from None
    else:
        raise MoneyError(f"{field}: expected a decimal string, got {type(text).__name__}")
    if not value.is_finite():
        raise MoneyError(f"{field}: {text!r} is not a finite number")
    return value


def round_half_up(value: Decimal) -> int:
    """Round a decimal number of fen to an integer fen, half-up (11.045 yuan -> 1105 fen)."""
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def parse_yuan(text: str | int | Decimal, *, field: str = "amount") -> int:
    """Parse a yuan amount with at most two decimals ("497.01") into fen (49701).

    Raises :class:`MoneyError` for more than two decimals, non-numbers or |amount| > AMOUNT_FEN_MAX.
    """
    value = to_decimal(text, field=field)
    fen = value * FEN_PER_YUAN
    if fen != fen.to_integral_value():
        raise MoneyError(f"{field}: {text!r} has more than two decimals (fen)")
    result = int(fen)
    check_amount(result, field=field, allow_zero=True, allow_negative=True)
    return result


def format_yuan(amount_fen: int) -> str:
    """Format fen as a yuan string with two decimals: 49701 -> "497.01", -5 -> "-0.05"."""
    if not isinstance(amount_fen, int) or isinstance(amount_fen, bool):
        raise MoneyError("amount must be an integer number of fen")
    sign = "-" if amount_fen < 0 else ""
    whole, frac = divmod(abs(amount_fen), FEN_PER_YUAN)
    return f"{sign}{whole}.{frac:02d}"


def check_amount(amount_fen: object, *, field: str = "amount_fen", allow_zero: bool = False,
                 allow_negative: bool = False) -> int:
    """Assert that ``amount_fen`` is an int within ±AMOUNT_FEN_MAX; return it.

    Raises :class:`MoneyError` naming ``field`` otherwise.
    """
    if not isinstance(amount_fen, int) or isinstance(amount_fen, bool):
        raise MoneyError(f"{field}: must be an integer number of fen")
    if amount_fen > AMOUNT_FEN_MAX or amount_fen < -AMOUNT_FEN_MAX:
        raise MoneyError(f"{field}: {amount_fen} is beyond the limit of {AMOUNT_FEN_MAX} fen")
    if amount_fen == 0 and not allow_zero:
        raise MoneyError(f"{field}: must not be zero")
    if amount_fen < 0 and not allow_negative:
        raise MoneyError(f"{field}: must not be negative")
    return amount_fen


def mul_half_up(amount_fen: int, ratio: Decimal) -> int:
    """``amount_fen × ratio`` rounded half-up to the fen (ratio a Decimal such as 0.70)."""
    return round_half_up(Decimal(amount_fen) * ratio)


def allocate(total_fen: int, weights: list[int]) -> list[int]:
    """Split ``total_fen`` in proportion to non-negative integer ``weights`` (largest remainder).

    The parts sum exactly to ``total_fen``; ties in the remainder go to the earlier weight.
    Raises :class:`MoneyError` when every weight is zero but the total is not.
    """
    if any(w < 0 for w in weights):
        raise MoneyError("weights must not be negative")
    weight_sum = sum(weights)
    if weight_sum == 0:
        if total_fen != 0:
            raise MoneyError("cannot allocate a non-zero amount over zero weights")
        return [0] * len(weights)
    parts = [total_fen * w // weight_sum for w in weights]
    remainders = [(total_fen * w % weight_sum, -i) for i, w in enumerate(weights)]
    shortfall = total_fen - sum(parts)
    for _, neg_i in sorted(remainders, reverse=True)[:shortfall]:
        parts[-neg_i] += 1
    assert sum(parts) == total_fen
    return parts


@dataclass(frozen=True, slots=True)
class Money:
    """An amount of one currency in minor units; refuses cross-currency arithmetic."""

    amount: int
    currency: str = "CNY"

    def __post_init__(self) -> None:
        if self.currency not in CURRENCY_EXPONENTS:
            raise MoneyError(f"unsupported currency {self.currency!r}")
        check_amount(self.amount, allow_zero=True, allow_negative=True)

    def _same(self, other: "Money") -> None:
        if not isinstance(other, Money) or other.currency != self.currency:
            raise MoneyError(f"cannot combine {self.currency} with {getattr(other, 'currency', other)!r}")

    def __add__(self, other: "Money") -> "Money":
        self._same(other)
        return Money(self.amount + other.amount, self.currency)

    def __sub__(self, other: "Money") -> "Money":
        self._same(other)
        return Money(self.amount - other.amount, self.currency)

    def __str__(self) -> str:
        return f"{format_yuan(self.amount)} {self.currency}"
