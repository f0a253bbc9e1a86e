"""Medical-insurance policy parameters per region, year, insurance type, tier and visit type.

A *policy* is the set of numbers that turns an itemised bill into the NHSA settlement split
(``settlement.split``): the deductible (起付线), the pooled fund's ratio (统筹基金支付比例), the
annual cap (封顶线), an optional second-tier fund above the cap (大额 / 大病, reported as
``hifmi_pay``), and the scope of what the personal account (个人账户) may pay.  The numbers are
data, one TOML *policy book* per region and insurance year, never code.

A policy is selected by the key ``(insutype, retired, hospital_tier, med_type)``:

* ``insutype``: NHSA insurance type, ``"310"`` employee basic, ``"390"`` urban-rural resident;
* ``retired``: whether the insured person is retired (employees; residents usually repeat rows);
* ``hospital_tier``: 1, 2 or 3 (community / county / city-and-above hospital);
* ``med_type``: NHSA visit type, ``"11"`` general outpatient, ``"13"`` emergency, ``"14"``
  chronic / special outpatient, ``"21"`` general inpatient, ``"24"`` emergency to inpatient...

Outpatient policies carry a deductible per insurance year (``deductible_per_year_fen``);
inpatient policies (med_type 21, 24, 52) carry a deductible per admission
(``deductible_per_admission_fen``) with the fraction of it charged on the 2nd and on the 3rd and
later admission of the year (``deductible_ratio_2nd_admission``,
``deductible_ratio_3rd_plus_admission``, e.g. ``"0.50"`` = half the deductible).

Policy book format (TOML)::

    [book]                       # required: who and what this file is
    name = "test-policy-P"
    region = "TEST"
    year = 2026                  # the insurance year it holds the policy of
    last_year = 2026             # optional: the last year it also covers (default: year)
    verified = false             # true only for figures checked against the published policy
    source = "where the figures come from"

    [defaults]                   # optional: inherited by every row
    acct_scope = "all_personal_part"
    annual_cap_fen = 1000000

    [defaults.outpatient]        # optional: inherited by outpatient rows only
    deductible_per_year_fen = 60000

    [defaults.inpatient]         # optional: inherited by inpatient rows only
    deductible_per_admission_fen = 80000
    deductible_ratio_2nd_admission = "0.50"
    deductible_ratio_3rd_plus_admission = "0.00"

    [[rows]]                     # one row per key; a key field may be a list (one row per value)
    insutype = "310"
    retired = false
    hospital_tier = [1, 2, 3]
    med_type = "11"
    fund_ratio = "0.70"

Precedence: row > ``defaults.outpatient`` / ``defaults.inpatient`` > ``defaults`` > ``[book]``
(only ``name``, ``source`` and ``verified`` come from ``[book]``).  Ratios are decimal strings
(``"0.70"``) so they stay exact; a TOML float is refused.  Amounts are TOML integers of fen.
Unknown fields, a ratio outside 0..1, a negative amount, an unknown ``acct_scope``, a
second-tier cap without a ratio (or the reverse), a deductible of the wrong kind for the visit
type and two rows with the same key are all refused at load with :class:`PolicyError`, whose
message names the file, the row and the field.

Pure: no clock, no network; the only I/O is reading a policy file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
from dataclasses import dataclass, field, fields
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ledger.money import AMOUNT_FEN_MAX, MoneyError, to_decimal

#: NHSA insurance types (insutype) a policy row may be written for.
INSUTYPES = frozenset({"310", "320", "330", "340", "390", "392", "510"})
#: NHSA visit types (med_type) settled as outpatient: deductible per insurance year.
OUTPATIENT_MED_TYPES = frozenset({"11", "12", "13", "14", "51"})
#: NHSA visit types settled as inpatient: deductible per admission (2303/2304).
INPATIENT_MED_TYPES = frozenset({"21", "24", "52"})
MED_TYPES = OUTPATIENT_MED_TYPES | INPATIENT_MED_TYPES
#: What the personal account may pay: the whole personal part, or only the in-policy part of it
#: (first self-pay of class B + deductible + co-insurance; not class C, not above price ceilings).
ACCT_SCOPES = ("all_personal_part", "inscope_selfpay_only")
HOSPITAL_TIERS = (1, 2, 3)

POLICY_FILE_BYTES_MAX = 1_000_000
POLICY_ROWS_MAX = 10_000

_KEY_FIELDS = ("insutype", "retired", "hospital_tier", "med_type")
_BOOK_FIELDS = ("name", "region", "year", "verified", "source")
_BOOK_OPTIONAL = ("last_year",)
_BUILTIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PolicyError(ValueError):
    """A policy (file, row or object) is malformed or contradictory; the message names the field."""


class PolicyNotFound(LookupError):
    """No policy row (or no built-in policy book) for the requested key; the message names it."""


class PolicyYearMissing(PolicyNotFound):
    """No loaded policy book covers the insurance year asked for; the message names the year
    and the books loaded."""


PolicyKey = tuple[str, bool, int, str]


# --- field parsers: one per field, shared by the loader and Policy.__post_init__ -------------

def _ratio(value: Any, label: str) -> Decimal:
    if isinstance(value, float):
        raise PolicyError(f'{label}: {value!r} is a float; write ratios as decimal strings such as "0.70"')
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise PolicyError(f'{label}: expected a decimal string such as "0.70", got {type(value).__name__}')
    try:
        ratio = to_decimal(value, field=label)
    except MoneyError as exc:
        raise PolicyError(str(exc)) from None
    if ratio < 0 or ratio > 1:
        raise PolicyError(f"{label}: {ratio} is outside 0..1")
    return ratio


def _fen(value: Any, label: str) -> int:
    if isinstance(value, float):
        raise PolicyError(f"{label}: {value!r} is a float; write amounts as integer fen")
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{label}: expected an integer number of fen, got {type(value).__name__}")
    if value < 0:
        raise PolicyError(f"{label}: {value} is negative")
    if value > AMOUNT_FEN_MAX:
        raise PolicyError(f"{label}: {value} is beyond the limit of {AMOUNT_FEN_MAX} fen")
    return value


def _text(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"{label}: expected a string, got {type(value).__name__}")
    return value


def _flag(value: Any, label: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{label}: expected true or false, got {value!r}")
    return value


def _insutype(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(f'{label}: expected a code string such as "310", got {value!r}')
    if value not in INSUTYPES:
        raise PolicyError(f"{label}: {value!r} is not a known insutype ({', '.join(sorted(INSUTYPES))})")
    return value


def _med_type(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(f'{label}: expected a code string such as "11", got {value!r}')
    if value not in MED_TYPES:
        raise PolicyError(f"{label}: {value!r} is not a known med_type ({', '.join(sorted(MED_TYPES))})")
    return value


def _tier(value: Any, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in HOSPITAL_TIERS:
        raise PolicyError(f"{label}: {value!r} is not a hospital tier (1, 2 or 3)")
    return value


def _acct_scope(value: Any, label: str) -> str:
    if value not in ACCT_SCOPES:
        raise PolicyError(f"{label}: {value!r} is not an acct_scope ({' or '.join(ACCT_SCOPES)})")
    return value


def _year(value: Any, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1990 <= value <= 2200:
        raise PolicyError(f"{label}: {value!r} is not an insurance year")
    return value


def _name(value: Any, label: str) -> str:
    text = _text(value, label)
    if not text.strip():
        raise PolicyError(f"{label}: must not be empty")
    return text


_PARSERS = {
    "name": _name,
    "region": _text,
    "year": _year,
    "last_year": _year,
    "insutype": _insutype,
    "retired": _flag,
    "hospital_tier": _tier,
    "med_type": _med_type,
    "fund_ratio": _ratio,
    "annual_cap_fen": _fen,
    "acct_scope": _acct_scope,
    "deductible_per_year_fen": _fen,
    "deductible_per_admission_fen": _fen,
    "deductible_ratio_2nd_admission": _ratio,
    "deductible_ratio_3rd_plus_admission": _ratio,
    "serious_illness_ratio": _ratio,
    "serious_illness_cap_fen": _fen,
    "verified": _flag,
    "source": _text,
}


@dataclass(frozen=True, slots=True)
class Policy:
    """One policy row: the parameters that settle a visit (NHSA 2206/2207, 2303/2304).

    Amounts are ``int`` fen, ratios ``Decimal`` in 0..1 (never float).  Outpatient rows have
    ``deductible_per_year_fen`` and no per-admission fields; inpatient rows (med_type 21/24/52)
    have ``deductible_per_admission_fen`` and both admission ratios and no yearly deductible.
    ``serious_illness_ratio`` and ``serious_illness_cap_fen`` (second-tier fund above the
    annual cap, reported as ``hifmi_pay``) are given together or not at all.
    Raises :class:`PolicyError` ("field: reason") when a field is missing, mistyped or
    contradicts another.
    """

    name: str
    insutype: str
    retired: bool
    hospital_tier: int
    med_type: str
    fund_ratio: Decimal
    annual_cap_fen: int
    acct_scope: str
    deductible_per_year_fen: int | None = None
    deductible_per_admission_fen: int | None = None
    deductible_ratio_2nd_admission: Decimal | None = None
    deductible_ratio_3rd_plus_admission: Decimal | None = None
    serious_illness_ratio: Decimal | None = None
    serious_illness_cap_fen: int | None = None
    region: str = ""
    year: int | None = None
    verified: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        optional = {"deductible_per_year_fen", "deductible_per_admission_fen",
                    "deductible_ratio_2nd_admission", "deductible_ratio_3rd_plus_admission",
                    "serious_illness_ratio", "serious_illness_cap_fen", "year"}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in optional:
                continue
            object.__setattr__(self, f.name, _PARSERS[f.name](value, f.name))
        per_admission = ("deductible_per_admission_fen", "deductible_ratio_2nd_admission",
                         "deductible_ratio_3rd_plus_admission")
        if self.is_inpatient:
            for name in per_admission:
                if getattr(self, name) is None:
                    raise PolicyError(f"{name}: missing (required for inpatient med_type {self.med_type})")
            if self.deductible_per_year_fen is not None:
                raise PolicyError(f"deductible_per_year_fen: not allowed for inpatient med_type "
                                  f"{self.med_type} (use deductible_per_admission_fen)")
        else:
            if self.deductible_per_year_fen is None:
                raise PolicyError(f"deductible_per_year_fen: missing (required for outpatient med_type {self.med_type})")
            for name in per_admission:
                if getattr(self, name) is not None:
                    raise PolicyError(f"{name}: not allowed for outpatient med_type {self.med_type} "
                                      f"(use deductible_per_year_fen)")
        if (self.serious_illness_cap_fen is None) != (self.serious_illness_ratio is None):
            if self.serious_illness_ratio is None:
                raise PolicyError("serious_illness_cap_fen: given without serious_illness_ratio")
            raise PolicyError("serious_illness_ratio: given without serious_illness_cap_fen")

    @property
    def is_inpatient(self) -> bool:
        """True for inpatient visit types (deductible per admission, NHSA 2303/2304)."""
        return self.med_type in INPATIENT_MED_TYPES

    @property
    def key(self) -> PolicyKey:
        """``(insutype, retired, hospital_tier, med_type)``."""
        return (self.insutype, self.retired, self.hospital_tier, self.med_type)

    @property
    def has_second_tier(self) -> bool:
        """True when a second-tier fund (hifmi_pay) pays above the annual cap."""
        return self.serious_illness_ratio is not None


POLICY_FIELDS = tuple(f.name for f in fields(Policy))
_ROW_FIELDS = tuple(n for n in POLICY_FIELDS if n not in ("region", "year"))


def _describe(key: PolicyKey) -> str:
    insutype, retired, tier, med_type = key
    return (f"insutype={insutype} retired={str(retired).lower()} "
            f"hospital_tier={tier} med_type={med_type}")


def _parse_table(table: Mapping[str, Any], label: str, allowed: tuple[str, ...],
                 *, lists_for_keys: bool = False) -> dict[str, Any]:
    """Parse each field of one TOML table; key fields may be lists when ``lists_for_keys``."""
    parsed: dict[str, Any] = {}
    for name, value in table.items():
        if name not in allowed:
            raise PolicyError(f"{label}.{name}: unknown field (known: {', '.join(allowed)})")
        parser = _PARSERS[name]
        if lists_for_keys and name in _KEY_FIELDS and isinstance(value, list):
            if not value:
                raise PolicyError(f"{label}.{name}: empty list")
            values = [parser(v, f"{label}.{name}[{i}]") for i, v in enumerate(value)]
            for i, v in enumerate(values):
                if v in values[:i]:
                    raise PolicyError(f"{label}.{name}[{i}]: {v!r} is listed twice")
            parsed[name] = values
        else:
            parsed[name] = parser(value, f"{label}.{name}")
    return parsed


def _expand(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per combination of the list-valued key fields."""
    out = [dict(row)]
    for name in _KEY_FIELDS:
        values = row.get(name)
        if isinstance(values, list):
            out = [{**r, name: v} for r in out for v in values]
    return out


def policy_from_mapping(data: Mapping[str, Any], *, where: str = "policy",
                        defaults: Mapping[str, Any] | None = None) -> Policy:
    """Build one :class:`Policy` from a plain mapping (e.g. the ``policy`` of a vector document).

    ``data`` holds the same fields as a policy-book row plus optionally ``region`` and ``year``;
    ``name`` defaults to ``"inline"``; ``defaults`` (already-typed field values) fill fields
    that ``data`` lacks.  Ratios are decimal strings (or Decimal / int), amounts int fen;
    floats are refused.  Raises :class:`PolicyError` "``where``.field: reason".
    """
    if not isinstance(data, Mapping):
        raise PolicyError(f"{where}: expected an object of policy fields, got {type(data).__name__}")
    parsed = {"name": "inline", **(defaults or {}), **_parse_table(data, where, POLICY_FIELDS)}
    return _build(parsed, where)


def _build(parsed: Mapping[str, Any], label: str) -> Policy:
    for name in ("insutype", "retired", "hospital_tier", "med_type", "fund_ratio",
                 "annual_cap_fen", "acct_scope"):
        if name not in parsed:
            raise PolicyError(f"{label}.{name}: missing")
    try:
        return Policy(**parsed)
    except PolicyError as exc:
        raise PolicyError(f"{label}.{exc}") from None


@dataclass(frozen=True)
class PolicyBook:
    """The policy rows of one region and insurance year, loaded from one TOML file.

    ``origin`` is the file name used in messages; ``policies`` maps
    ``(insutype, retired, hospital_tier, med_type)`` to :class:`Policy`.
    """

    name: str
    region: str
    year: int
    verified: bool
    source: str
    origin: str
    policies: Mapping[PolicyKey, Policy] = field(repr=False)
    #: the last insurance year the book covers (``[book] last_year``; its ``year`` when absent)
    last_year: int | None = None
    #: which text of the book this is: SHA-256 of the file, 16 hex digits (a corrected book
    #: of the same year has another); settlements record it, and refunds compare it
    digest: str = ""

    def covers(self, year: int) -> bool:
        """Whether the book holds the policy of insurance year ``year``."""
        return self.year <= year <= (self.last_year or self.year)

    @property
    def years_text(self) -> str:
        """The insurance years it covers, for messages: ``2026`` or ``2026-2099``."""
        last = self.last_year or self.year
        return str(self.year) if last == self.year else f"{self.year}-{last}"

    def find(self, insutype: str, retired: bool, hospital_tier: int, med_type: str) -> Policy:
        """The policy for one key; raises :class:`PolicyNotFound` naming the key and the book."""
        key = (insutype, retired, hospital_tier, med_type)
        try:
            return self.policies[key]
        except (KeyError, TypeError):
            raise PolicyNotFound(f"{self.origin}: no policy row for {_describe(key)}") from None

    def __iter__(self) -> Iterator[Policy]:
        return iter(self.policies.values())

    def __len__(self) -> int:
        return len(self.policies)


class PolicyShelf:
    """The policy books an engine settles with, each covering its insurance years (``[book]
    year`` to ``last_year``), no year covered twice.

    A visit is split with the book of its insurance year, and a refund re-split with the book
    of the year the refunded settlement belongs to — never with the book in force today: the
    deductible, ratios and caps of one year apply to that year's visits (NHSA: the parameters
    are published per year). A year no book covers is refused (:class:`PolicyYearMissing`)
    rather than settled with another year's figures. Raises :class:`PolicyError` for no book,
    or two books covering one year.
    """

    def __init__(self, books: Sequence[PolicyBook]) -> None:
        if not books:
            raise PolicyError("no policy book given")
        for i, book in enumerate(books):
            for other in books[:i]:
                first = max(book.year, other.year)
                if first <= min(book.last_year or book.year, other.last_year or other.year):
                    raise PolicyError(f"{other.origin} and {book.origin} both cover insurance year {first}")
        self.books = tuple(sorted(books, key=lambda b: b.year))

    def book_for(self, year: int) -> PolicyBook:
        """The book of insurance year ``year``; raises :class:`PolicyYearMissing`."""
        for book in self.books:
            if book.covers(year):
                return book
        loaded = ", ".join(f"{b.origin} ({b.years_text})" for b in self.books)
        raise PolicyYearMissing(f"no policy book covers insurance year {year} (loaded: {loaded}); "
                                f"load that year's book with the others (CITIZENCARD_POLICY)")

    def find(self, insutype: str, retired: bool, hospital_tier: int, med_type: str, year: int) -> Policy:
        """The policy for one key in the book of insurance ``year``; raises
        :class:`PolicyYearMissing` or :class:`PolicyNotFound` naming the key and the book."""
        return self.book_for(year).find(insutype, retired, hospital_tier, med_type)

    def __iter__(self) -> Iterator[PolicyBook]:
        return iter(self.books)


def parse_policy_book(text: str, origin: str) -> PolicyBook:
    """Parse the TOML text of a policy book (format in the module docstring).

    ``origin`` (a file name) prefixes every error message.  Raises :class:`PolicyError`
    "origin: rows[i].field: reason" for any malformed or contradictory field, duplicate keys
    included (rows are numbered from 0 in file order).
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{origin}: not valid TOML: {exc}") from None
    try:
        book = _parse_book(doc, origin)
    except PolicyError as exc:
        raise PolicyError(f"{origin}: {exc}") from None
    # the text's digest, line endings aside (a copy saved with CRLF is the same book)
    normalised = text.replace("\r\n", "\n").encode()
    return dataclasses.replace(book, digest=hashlib.sha256(normalised).hexdigest()[:16])


def _parse_book(doc: dict[str, Any], origin: str) -> PolicyBook:
    for name in doc:
        if name not in ("book", "defaults", "rows"):
            raise PolicyError(f"{name}: unknown top-level table (known: book, defaults, rows)")
    book = doc.get("book")
    if not isinstance(book, dict):
        raise PolicyError("book: missing [book] table (name, region, year, verified, source)")
    header = _parse_table(book, "book", _BOOK_FIELDS + _BOOK_OPTIONAL)
    for name in _BOOK_FIELDS:
        if name not in header:
            raise PolicyError(f"book.{name}: missing")
    last_year = header.get("last_year", header["year"])
    if last_year < header["year"]:
        raise PolicyError(f"book.last_year: {last_year} is before book.year {header['year']}")

    defaults_raw = doc.get("defaults", {})
    if not isinstance(defaults_raw, dict):
        raise PolicyError("defaults: expected a table")
    common_raw = {k: v for k, v in defaults_raw.items() if k not in ("outpatient", "inpatient")}
    common = _parse_table(common_raw, "defaults", _ROW_FIELDS)
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in ("outpatient", "inpatient"):
        sub = defaults_raw.get(kind, {})
        if not isinstance(sub, dict):
            raise PolicyError(f"defaults.{kind}: expected a table")
        by_kind[kind] = _parse_table(sub, f"defaults.{kind}", _ROW_FIELDS)

    rows = doc.get("rows")
    if not isinstance(rows, list) or not rows:
        raise PolicyError("rows: missing; add at least one [[rows]] table")
    if len(rows) > POLICY_ROWS_MAX:
        raise PolicyError(f"rows: {len(rows)} rows, more than {POLICY_ROWS_MAX}")

    base = {"name": header["name"], "source": header["source"], "verified": header["verified"],
            "region": header["region"], "year": header["year"]}
    policies: dict[PolicyKey, Policy] = {}
    defined_by: dict[PolicyKey, str] = {}
    for i, row in enumerate(rows):
        label = f"rows[{i}]"
        if not isinstance(row, dict):
            raise PolicyError(f"{label}: expected a table")
        parsed_row = _parse_table(row, label, _ROW_FIELDS, lists_for_keys=True)
        for one in _expand(parsed_row):
            med_type = one.get("med_type", common.get("med_type"))
            kind = "inpatient" if med_type in INPATIENT_MED_TYPES else "outpatient"
            policy = _build({**base, **common, **by_kind[kind], **one}, label)
            if policy.key in policies:
                raise PolicyError(f"{label}: duplicate key ({_describe(policy.key)}), "
                                  f"already defined by {defined_by[policy.key]}")
            policies[policy.key] = policy
            defined_by[policy.key] = label
    return PolicyBook(name=header["name"], region=header["region"], year=header["year"],
                      verified=header["verified"], source=header["source"], origin=origin,
                      policies=policies, last_year=last_year)


def load_policy_book(path: str | Path) -> PolicyBook:
    """Load a policy book from a TOML file (format in the module docstring).

    Raises :class:`PolicyError` naming the file and the field for a malformed or contradictory
    file (and for a file larger than ``POLICY_FILE_BYTES_MAX``); ``OSError`` when unreadable.
    """
    path = Path(path)
    data = path.read_bytes()
    return _book_from_bytes(data, path.name)


def _book_from_bytes(data: bytes, origin: str) -> PolicyBook:
    if len(data) > POLICY_FILE_BYTES_MAX:
        raise PolicyError(f"{origin}: {len(data)} bytes, more than {POLICY_FILE_BYTES_MAX}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{origin}: not UTF-8 text") from None
    return parse_policy_book(text, origin)


def builtin_names() -> list[str]:
    """Names of the policy books shipped in ``settlement/policies/`` (without ``.toml``)."""
    folder = resources.files(__package__).joinpath("policies")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_builtin(name: str) -> PolicyBook:
    """Load a policy book shipped with the package, e.g. ``load_builtin("test-policy-P")``.

    ``name`` may end in ``.toml``.  Raises :class:`PolicyNotFound` for an unknown name and
    :class:`PolicyError` for a malformed file.
    """
    stem = name[: -len(".toml")] if name.endswith(".toml") else name
    if not _BUILTIN_NAME.match(stem) or stem not in builtin_names():
        raise PolicyNotFound(f"no built-in policy book {name!r} (available: {', '.join(builtin_names())})")
    resource = resources.files(__package__).joinpath("policies", f"{stem}.toml")
    return _book_from_bytes(resource.read_bytes(), f"{stem}.toml")
