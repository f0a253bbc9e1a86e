"""The insurer's item catalogue (医保目录) that the settlement engine loads: pure data, no clock.

One :class:`CatalogueItem` per national medical-insurance code (``hilist_code``) says how the
insurer treats that drug, medical service or material:

* ``chrgitm_lv``: charge item level, ``"A"`` (甲类, fully in scope), ``"B"`` (乙类, the patient
  first pays ``selfpay_prop`` of the in-scope amount) or ``"C"`` (丙类, out of catalogue,
  wholly self-paid);
* ``pric_uplmt_amt``: the price ceiling in yuan per unit; the part of the unit price above it is
  self-paid (``overlmt_selfpay``);
* the raw reimbursement-restriction text and the hints parsed from it (hospital level, sex, age,
  inpatient-only, reserved to work-injury or maternity insurance).

File format (written by :func:`simulators.his.write_catalogue`, read by :func:`load_catalogue`)
------------------------------------------------------------------------------------------------
UTF-8 CSV (a BOM is tolerated). Before the header there may be comment lines starting with
``#``; a comment of the form ``# key: value`` is kept in :attr:`Catalogue.meta`. A
``# synthetic: ...`` comment marks every item of the file as synthetic
(``CatalogueItem.synthetic``) and says which columns were invented. Then the header and one row
per item::

    # synthetic: chrgitm_lv, selfpay_prop, pric, pric_uplmt_amt and unit are SYNTHETIC ...
    # seed: 42
    hilist_code,name,kind,chrgitm_lv,selfpay_prop,pric,pric_uplmt_amt,unit,restriction,source
    XB05BAU005B002010101415,ω-3鱼油脂肪乳注射液,drug,B,0.10,98.415,,支,限定就医方式:住院｜…,jdzwq/…

=================  =========================================================================
column             content
=================  =========================================================================
hilist_code        national code, unique in the file, no blanks (required)
name               item name (required)
kind               ``drug`` / ``service`` / ``material``
chrgitm_lv         ``A`` / ``B`` / ``C``
selfpay_prop       class-B first self-pay ratio, plain decimal in 0..1 (``0.10``); must be 0 for
                   class A (empty means 0); ignored for class C
pric               the hospital's list unit price in yuan, plain decimal > 0, up to 6 decimals
                   (``0.415``); empty when the catalogue carries no price
pric_uplmt_amt     price ceiling in yuan per unit, plain decimal > 0, up to 6 decimals; empty: none
unit               pricing unit (``片``, ``支``, ``次`` ...), may be empty
restriction        the raw restriction text of the source (may be empty)
source             where the row comes from (may be empty)
=================  =========================================================================

Extra columns are ignored. Decimals are parsed exactly (:func:`ledger.money.to_decimal`), never
as binary floats; exponent notation, ``NaN`` and signs other than a leading minus (which is
refused as negative) are refused.

Restriction hints
-----------------
The sample's restriction texts come in two shapes: drug rules ``限定类型:值｜说明`` (e.g.
``限定机构等级:二级｜限二级及以上医疗机构。``) and service rules ``列名=值; 列名=值`` (e.g.
``性别限制=女; 频次限制=1次每日``). :func:`parse_restriction` reads the structured parts first and
falls back to a few plain-text phrases (``限二级及以上``, ``限女性``, ``限18岁以下``). Age words
map through :data:`AGE_GROUPS`; ``N岁以下`` / ``N岁以上`` include N (Civil Code art. 1259: 以上、
以下 include the number itself), ``未满/不满N岁`` excludes it. Every other restriction (disease,
frequency, course, specialty, amount) stays in the raw text only.
"""

from __future__ import annotations

import csv
import io
import os
import re
import unicodedata
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterable, Iterator

from ledger.money import MoneyError, to_decimal

KINDS = ("drug", "service", "material")
CLASSES = ("A", "B", "C")
#: Columns a catalogue file must have, in the order :func:`simulators.his.write_catalogue` writes.
COLUMNS = ("hilist_code", "name", "kind", "chrgitm_lv", "selfpay_prop", "pric", "pric_uplmt_amt",
           "unit", "restriction", "source")
#: Most decimals accepted in a price or ceiling (NHSA fields are number(16,6)).
PRICE_DECIMALS_MAX = 6

#: Age words of the restriction texts -> (age_min, age_max) in completed years, inclusive.
#: 儿童 is taken as under 18 (未成年人), 婴幼儿 as under 3, 新生儿 (first 28 days) as age 0.
#: A project convention: change it here if the region's list defines the words differently.
AGE_GROUPS: dict[str, tuple[int | None, int | None]] = {
    "新生儿": (0, 0),
    "婴幼儿": (0, 2),
    "婴儿": (0, 0),
    "儿童": (0, 17),
    "小儿": (0, 17),
    "未成年人": (0, 17),
    "老年人": (60, None),
}
_LEVELS = {"一": 1, "二": 2, "三": 3, "1": 1, "2": 2, "3": 3}
_SEXES = {"男": "M", "女": "F"}
#: Insurance schemes that make an item "not payable by basic medical insurance".
INSURANCE_ONLY = {"工伤": "work_injury", "生育": "maternity"}


class CatalogueError(ValueError):
    """A catalogue row or file is malformed.

    ``row`` is the 1-based line number in the file (``None`` outside a file), ``field`` the
    column at fault (``None`` for file-level problems), ``code`` the row's hilist_code if known.
    """

    def __init__(self, message: str, *, row: int | None = None, field: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.row = row
        self.field = field
        self.code = code


class UnknownItem(LookupError):
    """A code is not in the catalogue; ``code`` names it."""

    def __init__(self, code: str) -> None:
        super().__init__(f"hilist_code {code!r} is not in the catalogue")
        self.code = code


@dataclass(frozen=True, slots=True)
class RestrictionHints:
    """What :func:`parse_restriction` understood of a restriction text.

    hospital_level_min: 1/2/3 (一级/二级/三级 and above) or None; sex: "M"/"F"/None;
    age_min/age_max: inclusive completed years or None; inpatient_only: only paid for inpatients;
    insurance_only: "work_injury" (工伤) / "maternity" (生育) when the item is listed only for that
    scheme (then basic medical insurance does not pay it), else None.
    """

    hospital_level_min: int | None = None
    sex: str | None = None
    age_min: int | None = None
    age_max: int | None = None
    inpatient_only: bool = False
    insurance_only: str | None = None


def _structured_parts(text: str) -> dict[str, str]:
    """``限定类型:值｜说明`` and ``列名=值; 列名=值`` -> {name: value} (free text is left out)."""
    head = text.partition("｜")[0]
    parts: dict[str, str] = {}
    for chunk in re.split(r"[;；]", head):
        match = re.fullmatch(r"\s*([^:：=\s]{2,12})\s*[:：=](.*)", chunk, flags=re.S)
        if match:
            parts.setdefault(match.group(1), match.group(2).strip())
    return parts


def _age_from_words(value: str) -> tuple[int | None, int | None] | None:
    """Age bounds from an age word (``儿童``) or phrase (``18岁以下``); None when not understood."""
    value = value.strip()
    if value in AGE_GROUPS:
        return AGE_GROUPS[value]
    match = re.fullmatch(r"(未满|不满)?(\d{1,3})周?岁(及?以下|及?以上|以内)?", value)
    if not match:
        return None
    years = int(match.group(2))
    if match.group(1):
        return (None, years - 1) if years > 0 else None
    suffix = match.group(3) or ""
    if suffix.endswith("以上"):
        return (years, None)
    if suffix:
        return (None, years)
    return None


_AGE_PHRASE = re.compile(
    r"限((?:未满|不满)\d{1,3}周?岁|\d{1,3}周?岁(?:及?以下|及?以上|以内)|"
    + "|".join(sorted(AGE_GROUPS, key=len, reverse=True))
    + r")(?:的?(?:患者|人群|儿童|使用))?(?=[。；;，,、\s]|$)")


def parse_restriction(text: str) -> RestrictionHints:
    """Parse the hints the engine can check from a raw restriction text.

    Shapes: drug rules ``限定机构等级:二级｜说明``, service rules ``性别限制=女; 频次限制=1次每日``,
    or plain text (``限二级及以上医疗机构``, ``限女性``, ``限18岁以下``, ``限儿童``). Structured
    values win over phrases in the text. Returns :class:`RestrictionHints` (all None/False for an
    empty text). Raises ``TypeError`` for a non-str; never raises for odd text: what is not
    understood stays only in the raw text.
    """
    if not isinstance(text, str):
        raise TypeError("restriction must be a str")
    parts = _structured_parts(text)

    level = None
    for key in ("限定机构等级", "机构限制", "机构等级"):
        match = re.match(r"([一二三123])级", parts.get(key, ""))
        if match:
            level = _LEVELS[match.group(1)]
            break
    if level is None:
        match = re.search(r"限([一二三])级及以上", text)
        if match:
            level = _LEVELS[match.group(1)]

    sex = None
    for key in ("限定性别对象", "性别限制", "限定性别"):
        value = parts.get(key, "")[:1]
        if value in _SEXES:
            sex = _SEXES[value]
            break
    if sex is None:
        match = re.search(r"限(男|女)性", text)
        if match:
            sex = _SEXES[match.group(1)]

    ages: tuple[int | None, int | None] | None = None
    for key in ("限定年龄对象", "年龄限制", "限定年龄"):
        if key in parts:
            ages = _age_from_words(parts[key])
            if ages is not None:
                break
    if ages is None:
        match = _AGE_PHRASE.search(text)
        if match:
            ages = _age_from_words(match.group(1))
    age_min, age_max = ages if ages is not None else (None, None)

    inpatient = any(parts.get(key, "").startswith("住院")
                    for key in ("限定就医方式", "就医限制", "就医方式"))

    insurance_only = None
    for key in ("限定保险类型", "险种限制", "保险类型"):
        value = parts.get(key, "")
        for word, scheme in INSURANCE_ONLY.items():
            if value.startswith(word):
                insurance_only = scheme
                break
        if insurance_only:
            break

    return RestrictionHints(hospital_level_min=level, sex=sex, age_min=age_min, age_max=age_max,
                            inpatient_only=inpatient, insurance_only=insurance_only)


def _fail(field_name: str, message: str) -> CatalogueError:
    return CatalogueError(f"field {field_name}: {message}", field=field_name)


def _check_decimal(value: object, field_name: str, *, positive: bool) -> Decimal:
    if not isinstance(value, Decimal) or isinstance(value, bool):
        raise _fail(field_name, f"must be a Decimal, got {type(value).__name__}")
    if not value.is_finite():
        raise _fail(field_name, f"{value} is not a finite number")
    if value < 0:
        raise _fail(field_name, f"{value} is negative")
    if positive and value == 0:
        raise _fail(field_name, "must be greater than zero")
    if -value.as_tuple().exponent > PRICE_DECIMALS_MAX:  # type: ignore[operator]
        raise _fail(field_name, f"{value} has more than {PRICE_DECIMALS_MAX} decimals")
    return value


@dataclass(frozen=True, slots=True)
class CatalogueItem:
    """One catalogue entry. Money fields are yuan as exact :class:`~decimal.Decimal`, never float.

    hilist_code: national code; name; kind: "drug"/"service"/"material"; chrgitm_lv: "A"/"B"/"C";
    selfpay_prop: class-B first self-pay ratio in 0..1 (0 for A; ignored for C);
    pric_uplmt_amt: price ceiling per unit in yuan or None; unit: pricing unit; restriction: raw
    source text; synthetic: classes, prices, units and ceilings were generated, not real;
    source: provenance of the row; pric: the hospital's list unit price in yuan or None (the engine
    settles on the bill's price; this one is what the HIS simulator bills).

    The hints (hospital_level_min, sex, age_min, age_max, inpatient_only, insurance_only; see
    :class:`RestrictionHints`) are derived from ``restriction`` on construction and cannot be
    passed in. Raises :class:`CatalogueError` (naming the field) for an invalid value.
    """

    hilist_code: str
    name: str
    kind: str
    chrgitm_lv: str
    selfpay_prop: Decimal
    pric_uplmt_amt: Decimal | None
    unit: str
    restriction: str = ""
    synthetic: bool = False
    source: str = ""
    pric: Decimal | None = None
    hospital_level_min: int | None = field(init=False, default=None)
    sex: str | None = field(init=False, default=None)
    age_min: int | None = field(init=False, default=None)
    age_max: int | None = field(init=False, default=None)
    inpatient_only: bool = field(init=False, default=False)
    insurance_only: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        for name in ("hilist_code", "name", "kind", "chrgitm_lv", "unit", "restriction", "source"):
            if not isinstance(getattr(self, name), str):
                raise _fail(name, f"must be a str, got {type(getattr(self, name)).__name__}")
        for name in ("hilist_code", "name", "kind", "chrgitm_lv", "unit"):
            if any(unicodedata.category(ch) == "Cc" for ch in getattr(self, name)):
                raise _fail(name, "contains control characters")
        code = self.hilist_code
        if not code or code != code.strip() or any(ch.isspace() for ch in code):
            raise _fail("hilist_code", f"{code!r} must be non-empty and contain no blanks")
        if not self.name.strip():
            raise _fail("name", "must not be empty")
        if self.kind not in KINDS:
            raise _fail("kind", f"{self.kind!r} is not one of {', '.join(KINDS)}")
        if self.chrgitm_lv not in CLASSES:
            raise _fail("chrgitm_lv", f"unknown class {self.chrgitm_lv!r}, expected A, B or C")
        prop = _check_decimal(self.selfpay_prop, "selfpay_prop", positive=False)
        if prop > 1:
            raise _fail("selfpay_prop", f"ratio {prop} is out of 0..1")
        if self.chrgitm_lv == "A" and prop != 0:
            raise _fail("selfpay_prop", f"class A items have no first self-pay, got {prop}")
        if self.pric_uplmt_amt is not None:
            _check_decimal(self.pric_uplmt_amt, "pric_uplmt_amt", positive=True)
        if self.pric is not None:
            _check_decimal(self.pric, "pric", positive=True)
        if not isinstance(self.synthetic, bool):
            raise _fail("synthetic", "must be a bool")
        hints = parse_restriction(self.restriction)
        for name in ("hospital_level_min", "sex", "age_min", "age_max", "inpatient_only",
                     "insurance_only"):
            object.__setattr__(self, name, getattr(hints, name))

    @property
    def hints(self) -> RestrictionHints:
        """The parsed restriction hints as one value."""
        return RestrictionHints(self.hospital_level_min, self.sex, self.age_min, self.age_max,
                                self.inpatient_only, self.insurance_only)

    @property
    def restricts_visits(self) -> bool:
        """True when the item is paid only for some visits: inpatients, a minimum hospital
        level, one sex or an age range (the restrictions the engine checks; see
        :func:`settlement.service.restriction_unmet`)."""
        return bool(self.inpatient_only or self.hospital_level_min is not None or self.sex is not None
                    or self.age_min is not None or self.age_max is not None)

    @property
    def basic_insurance_payable(self) -> bool:
        """False when the item is listed only for work-injury or maternity insurance."""
        return self.insurance_only is None


class Catalogue:
    """An immutable set of :class:`CatalogueItem` keyed by hilist_code, in insertion order.

    ``meta`` holds the file's ``# key: value`` comments (e.g. ``synthetic``, ``seed``).
    Raises :class:`CatalogueError` (field hilist_code) for a duplicate code.
    """

    __slots__ = ("_items", "meta")

    def __init__(self, items: Iterable[CatalogueItem], meta: dict[str, str] | None = None) -> None:
        self._items: dict[str, CatalogueItem] = {}
        for item in items:
            if not isinstance(item, CatalogueItem):
                raise TypeError(f"expected CatalogueItem, got {type(item).__name__}")
            if item.hilist_code in self._items:
                raise CatalogueError(f"field hilist_code: duplicate code {item.hilist_code!r}",
                                     field="hilist_code", code=item.hilist_code)
            self._items[item.hilist_code] = item
        self.meta: dict[str, str] = dict(meta or {})

    def get(self, code: str) -> CatalogueItem:
        """The item for ``code``; raises :class:`UnknownItem` naming the code when absent."""
        try:
            return self._items[code]
        except (KeyError, TypeError):
            raise UnknownItem(code) from None

    def __contains__(self, code: object) -> bool:
        return code in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[CatalogueItem]:
        return iter(self._items.values())

    @property
    def synthetic(self) -> bool:
        """True when the file said (``# synthetic:``) that some of its columns were generated."""
        return "synthetic" in self.meta

    def __repr__(self) -> str:
        return f"Catalogue({len(self)} items{', synthetic' if self.synthetic else ''})"


_PLAIN_DECIMAL = re.compile(r"\d+(\.\d+)?")


def parse_decimal_field(text: str, field_name: str, *, empty: Decimal | None = None,
                        allow_empty: bool = True) -> Decimal | None:
    """Parse a catalogue decimal cell exactly: ``"0.415"`` -> Decimal("0.415").

    Empty text gives ``empty`` (or an error when ``allow_empty`` is False). Raises
    :class:`CatalogueError` naming ``field_name`` for non-numbers, negatives, exponent notation.
    """
    text = text.strip()
    if not text:
        if not allow_empty:
            raise _fail(field_name, "is empty")
        return empty
    try:
        value = to_decimal(text, field=field_name)
    except MoneyError:
        raise _fail(field_name, f"{text!r} is not a decimal number: write a plain decimal (digits, optional "
                                "point)") from None
    if value < 0:
        raise _fail(field_name, f"{text!r} is negative")
    if not _PLAIN_DECIMAL.fullmatch(text):
        raise _fail(field_name, f"{text!r} is not a plain decimal (digits, optional point)")
    return value


def _item_from_row(row: dict[str, str], synthetic: bool) -> CatalogueItem:
    cls = row["chrgitm_lv"].strip()
    prop = parse_decimal_field(row["selfpay_prop"], "selfpay_prop", empty=Decimal(0))
    return CatalogueItem(
        hilist_code=row["hilist_code"].strip(),
        name=row["name"].strip(),
        kind=row["kind"].strip(),
        chrgitm_lv=cls,
        selfpay_prop=prop,  # type: ignore[arg-type]
        pric_uplmt_amt=parse_decimal_field(row["pric_uplmt_amt"], "pric_uplmt_amt"),
        unit=row["unit"].strip(),
        restriction=row["restriction"],
        synthetic=synthetic,
        source=row["source"].strip(),
        pric=parse_decimal_field(row["pric"], "pric"),
    )


def parse_catalogue(text: str, *, origin: str = "<catalogue>") -> Catalogue:
    """Parse catalogue CSV text (format in the module docstring) into a :class:`Catalogue`.

    ``origin`` names the file in messages. Raises :class:`CatalogueError` naming the line
    (``row``), the column (``field``) and the code of the first malformed row, a missing column,
    or a duplicate code.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.splitlines(keepends=True)
    meta: dict[str, str] = {}
    skipped = 0
    while skipped < len(lines) and (lines[skipped].startswith("#") or not lines[skipped].strip()):
        comment = lines[skipped].lstrip("#").strip()
        key, sep, value = comment.partition(":")
        if sep and key.strip() and " " not in key.strip():
            meta.setdefault(key.strip(), value.strip())
        skipped += 1
    reader = csv.DictReader(io.StringIO("".join(lines[skipped:]), newline=""))
    header = reader.fieldnames
    if not header:
        raise CatalogueError(f"{origin}: no header line", row=skipped + 1)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise CatalogueError(f"{origin} line {skipped + 1}: field {missing[0]}: column missing "
                             f"from the header", row=skipped + 1, field=missing[0])
    synthetic = "synthetic" in meta
    items: dict[str, CatalogueItem] = {}
    first_line: dict[str, int] = {}
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:
            line = skipped + reader.line_num
            raise CatalogueError(f"{origin} line {line}: not valid CSV: {exc}", row=line) from None
        line = skipped + reader.line_num  # physical line where the record ends
        code = (row.get("hilist_code") or "").strip()
        where = f"{origin} line {line} (hilist_code {code!r})"
        if None in row:
            raise CatalogueError(f"{where}: field {header[-1]}: more cells than the "
                                 f"{len(header)} columns of the header", row=line,
                                 field=header[-1], code=code)
        short = [c for c in COLUMNS if row.get(c) is None]
        if short:
            raise CatalogueError(f"{where}: field {short[0]}: cell missing (fewer cells than "
                                 f"the header)", row=line, field=short[0], code=code)
        try:
            item = _item_from_row(row, synthetic)
        except CatalogueError as exc:
            raise CatalogueError(f"{where}: {exc}", row=line, field=exc.field, code=code) from None
        if item.hilist_code in items:
            raise CatalogueError(f"{where}: field hilist_code: duplicate code, first on line "
                                 f"{first_line[item.hilist_code]}", row=line,
                                 field="hilist_code", code=code)
        items[item.hilist_code] = item
        first_line[item.hilist_code] = line
    return Catalogue(items.values(), meta)


def load_catalogue(path: str | os.PathLike[str]) -> Catalogue:
    """Read a catalogue CSV file (format in the module docstring) into a :class:`Catalogue`.

    Raises :class:`CatalogueError` naming the file, line, column and code of a malformed row
    (unknown class, ratio out of 0..1, negative or unparseable price, duplicate code, ...) or
    the line of text that is not UTF-8 or not CSV; ``OSError`` when the file cannot be read.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise CatalogueError(f"{os.fspath(path)} line {line}: not UTF-8 text ({exc.reason})",
                             row=line) from None
    return parse_catalogue(text, origin=os.fspath(path))
