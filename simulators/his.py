"""Hospital information system (HIS) simulator: a synthetic insurer catalogue and itemised bills.

Two jobs:

1. :func:`generate_catalogue` turns the 323 real rows of ``simulators/data/catalogue-sample.csv``
   (real national codes, names and reimbursement restrictions, but no classes, prices or units;
   provenance in ``simulators/data/README.md``) into a complete catalogue by inventing, from a
   seed, the charge class (A/B/C), the class-B first self-pay ratio, a pricing unit, a unit price
   and, for some class-B items, a price ceiling. :func:`write_catalogue` writes it in the format
   :func:`settlement.catalogue.load_catalogue` reads, with a ``# synthetic:`` header that says
   which columns are invented and from which seed.
2. :class:`HisSimulator` makes bills (fee-detail lines in NHSA 2204 shape) from a catalogue, as
   plain JSON-ready dicts of strings that an HTTP client can send as they are.

Everything is deterministic: randomness comes only from ``random.Random`` objects seeded by the
caller, and money is built from integers and exact decimal strings (no float, no ``round``).
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Iterable

from ledger.money import format_yuan, round_half_up
from settlement.catalogue import (COLUMNS, KINDS, Catalogue, CatalogueError, CatalogueItem,
                                  parse_restriction)

#: The real sample shipped with the repository (a byte-for-byte copy of the shared data file).
SAMPLE_CSV = Path(__file__).resolve().parent / "data" / "catalogue-sample.csv"
#: Where the sample's codes, names and restrictions come from (see simulators/data/README.md).
SAMPLE_PROVENANCE = ("jdzwq/MediModel at commit 573b603d13a83f8e8d44d054aa0da80e8afd048e "
                     "(source files last changed in d55338b6df3d53f7c21ad2c9284a984bee0b293a); "
                     "each row's source column gives repo:path")
SAMPLE_COLUMNS = ("code", "name", "kind", "chrgitm_lv", "unit", "price_yuan", "restriction",
                  "source")

#: Class draw in percent for items payable by basic medical insurance.
CLASS_WEIGHTS = (("A", 50), ("B", 35), ("C", 15))
#: Class-B first self-pay ratios to draw from.
SELFPAY_PROPS = ("0.05", "0.10", "0.15", "0.20", "0.30")
#: Share (percent) of class-B items that get a price ceiling, and the ceiling's range in percent
#: of the unit price (always strictly below it).
CEILING_PERCENT = 20
CEILING_OF_PRICE = (60, 95)
#: Share (percent) of drugs priced with three decimals (e.g. 0.415 yuan a tablet).
THREE_DECIMAL_DRUGS = 30
#: Price bands per kind in thousandths of a yuan (li): (low, high, weight).
PRICE_BANDS: dict[str, tuple[tuple[int, int, int], ...]] = {
    # (low li, high li, weight): mostly outpatient-sized prices, a thin tail of dear items.
    "drug": ((50, 999, 30), (1_000, 9_999, 40), (10_000, 99_999, 24),
             (100_000, 999_999, 5), (1_000_000, 3_000_000, 1)),
    "service": ((1_000, 9_999, 35), (10_000, 99_999, 50), (100_000, 999_999, 13),
                (1_000_000, 8_000_000, 2)),
    "material": ((5_000, 99_999, 55), (100_000, 999_999, 38), (1_000_000, 9_999_999, 6),
                 (10_000_000, 30_000_000, 1)),
}
#: Drug units guessed from the generic name (first match wins), else drawn from DRUG_UNITS.
DRUG_UNIT_BY_NAME = (("注射", "支"), ("疫苗", "支"), ("口服液", "支"), ("胶囊", "粒"),
                     ("栓", "粒"), ("片", "片"), ("颗粒", "袋"), ("散", "袋"), ("丸", "丸"),
                     ("膏", "支"), ("凝胶", "支"), ("乳", "支"))
DRUG_UNITS = ("片", "粒", "支")
SERVICE_UNITS = ("次", "项")
MATERIAL_UNITS = ("个",)
#: Quantity ranges per kind (inclusive); drugs above DRUG_DEAR_LI per unit come in fewer units.
QUANTITY = {"drug": (1, 30), "service": (1, 3), "material": (1, 2)}
DRUG_DEAR_LI = 100_000  # 100 yuan
DRUG_DEAR_QUANTITY = (1, 5)


class SyntheticCatalogue(list):
    """A ``list[CatalogueItem]`` made by :func:`generate_catalogue`; remembers its ``seed``."""

    def __init__(self, items: Iterable[CatalogueItem], seed: int) -> None:
        super().__init__(items)
        self.seed = seed


def _weighted(value: int, choices: Iterable[tuple]) -> tuple:
    """The choice that ``value`` (0 <= value < sum of weights, the last element) falls on."""
    for choice in choices:
        value -= choice[-1]
        if value < 0:
            return choice
    raise ValueError("value beyond the total weight")


def _draw_weighted(rng: random.Random, choices: tuple[tuple, ...]) -> tuple:
    return _weighted(rng.randrange(sum(c[-1] for c in choices)), choices)


def _li_to_text(li: int, decimals: int) -> str:
    """Thousandths of a yuan -> "12.345" (3 decimals) or "12.34" (2: li a multiple of 10)."""
    if decimals == 3:
        return f"{li // 1000}.{li % 1000:03d}"
    assert li % 10 == 0
    return f"{li // 1000}.{(li % 1000) // 10:02d}"


def _draw_price_li(rng: random.Random, kind: str) -> tuple[int, int]:
    """(price in li, decimals) for one item; always four draws so rows stay independent."""
    low, high, _ = _draw_weighted(rng, PRICE_BANDS[kind])
    li = rng.randint(low, high)
    three = rng.randrange(100) < THREE_DECIMAL_DRUGS
    if kind == "drug" and three:
        return li, 3
    li -= li % 10
    return max(li, 10), 2


def _unit(rng: random.Random, kind: str, name: str) -> str:
    draw = rng.randrange(6)
    if kind == "drug":
        for marker, unit in DRUG_UNIT_BY_NAME:
            if marker in name:
                return unit
        return DRUG_UNITS[draw % len(DRUG_UNITS)]
    if kind == "service":
        return SERVICE_UNITS[draw % len(SERVICE_UNITS)]
    return MATERIAL_UNITS[draw % len(MATERIAL_UNITS)]


def _read_sample(sample_csv_path: str | os.PathLike[str]) -> list[dict[str, str]]:
    with open(sample_csv_path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in SAMPLE_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise CatalogueError(f"{sample_csv_path}: field {missing[0]}: column missing from the "
                                 f"sample header", row=1, field=missing[0])
        rows = []
        seen: set[str] = set()
        for row in reader:
            where = f"{sample_csv_path} line {reader.line_num}"
            code = (row.get("code") or "").strip()
            if not code or code in seen:
                raise CatalogueError(f"{where}: field code: {'empty' if not code else 'duplicate'}"
                                     f" code {code!r}", row=reader.line_num, field="code")
            if row.get("kind") not in KINDS:
                raise CatalogueError(f"{where}: field kind: {row.get('kind')!r} is not one of "
                                     f"{', '.join(KINDS)}", row=reader.line_num, field="kind")
            seen.add(code)
            rows.append(row)
    return rows


def generate_catalogue(sample_csv_path: str | os.PathLike[str], seed: int) -> SyntheticCatalogue:
    """Complete the real sample rows into a synthetic catalogue, deterministically from ``seed``.

    Input: the sample CSV (columns code,name,kind,chrgitm_lv,unit,price_yuan,restriction,source;
    its empty class/unit/price columns are ignored). Output: one :class:`CatalogueItem` per sample
    row, in file order, ``synthetic=True``, with the real code, name, kind, restriction and source
    and generated:

    * ``chrgitm_lv``: about 50 % A, 35 % B, 15 % C; items listed only for work-injury or
      maternity insurance (限定保险类型:工伤/生育) are always C for basic medical insurance;
    * ``selfpay_prop``: for B one of 0.05/0.10/0.15/0.20/0.30, else 0;
    * ``unit``: by kind (drugs from the name: 注射液 -> 支, 胶囊 -> 粒 ..., services 次/项,
      materials 个);
    * ``pric``: unit price in yuan, Decimal; drugs 0.05..3000 (30 % with three decimals, e.g.
      0.415), services 1..8000 and materials 5..30000 with two decimals;
    * ``pric_uplmt_amt``: for about 20 % of B items a ceiling of 60..95 % of the price, rounded
      half-up to the fen and strictly below the price; else None.

    Same path and seed -> equal lists. Raises ``TypeError`` for a non-int seed and
    :class:`CatalogueError` for a malformed sample (missing column, empty or duplicate code,
    unknown kind).
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError("seed must be an int")
    rng = random.Random(seed)
    items = []
    for row in _read_sample(sample_csv_path):
        kind, name, restriction = row["kind"], row["name"].strip(), row["restriction"] or ""
        # A fixed number of draws per row, whatever the branch, so rows are independent.
        class_draw = rng.randrange(100)
        prop_draw = rng.randrange(len(SELFPAY_PROPS))
        ceiling_draw = rng.randrange(100)
        ceiling_percent = rng.randint(*CEILING_OF_PRICE)
        unit = _unit(rng, kind, name)
        price_li, decimals = _draw_price_li(rng, kind)

        if parse_restriction(restriction).insurance_only is not None:
            chrgitm_lv = "C"
        else:
            chrgitm_lv = _weighted(class_draw, CLASS_WEIGHTS)[0]
        selfpay_prop = Decimal(SELFPAY_PROPS[prop_draw]) if chrgitm_lv == "B" else Decimal("0")
        ceiling = None
        if chrgitm_lv == "B" and ceiling_draw < CEILING_PERCENT:
            ceiling_fen = round_half_up(Decimal(price_li * ceiling_percent) / 1000)
            if ceiling_fen * 10 >= price_li:
                ceiling_fen = (price_li - 1) // 10
            if ceiling_fen >= 1:
                ceiling = Decimal(format_yuan(ceiling_fen))
        items.append(CatalogueItem(
            hilist_code=row["code"].strip(), name=name, kind=kind, chrgitm_lv=chrgitm_lv,
            selfpay_prop=selfpay_prop, pric_uplmt_amt=ceiling, unit=unit,
            restriction=restriction, synthetic=True, source=(row["source"] or "").strip(),
            pric=Decimal(_li_to_text(price_li, decimals))))
    return SyntheticCatalogue(items, seed)


def _header_lines(seed: int | None, synthetic: bool) -> list[str]:
    if not synthetic:
        return []
    return [
        f"# synthetic: chrgitm_lv (class A/B/C), selfpay_prop, pric, pric_uplmt_amt and unit are "
        f"SYNTHETIC, generated by simulators.his.generate_catalogue from seed {seed}; they are "
        f"not real classes, ratios, prices or ceilings",
        f"# real: hilist_code, name, kind, restriction and source are real and unchanged, from "
        f"simulators/data/catalogue-sample.csv: {SAMPLE_PROVENANCE} "
        f"(provenance: simulators/data/README.md)",
        "# licence: none found upstream; test and sample data only",
        f"# seed: {seed}",
    ]


def _cell(value: Decimal | None) -> str:
    return "" if value is None else str(value)


def catalogue_csv(rows: Iterable[CatalogueItem], *, seed: int | None = None) -> str:
    """The catalogue file's text (format: :mod:`settlement.catalogue`) for ``rows``.

    ``seed`` defaults to ``rows.seed`` (a :class:`SyntheticCatalogue`); when any row is synthetic
    a seed is required (the header names it) and ``ValueError`` is raised without one.
    Raises :class:`CatalogueError` for duplicate codes. Lines end with ``\\n``.
    """
    items = list(Catalogue(rows))  # checks types and duplicates
    if seed is None:
        seed = getattr(rows, "seed", None)
    synthetic = any(item.synthetic for item in items)
    if synthetic and seed is None:
        raise ValueError("synthetic rows need the seed they were generated from (seed=...)")
    out = io.StringIO()
    for line in _header_lines(seed, synthetic):
        out.write(line + "\n")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for item in items:
        writer.writerow([item.hilist_code, item.name, item.kind, item.chrgitm_lv,
                         _cell(item.selfpay_prop), _cell(item.pric), _cell(item.pric_uplmt_amt),
                         item.unit, item.restriction, item.source])
    return out.getvalue()


def write_catalogue(rows: Iterable[CatalogueItem], path: str | os.PathLike[str], *,
                    seed: int | None = None) -> Path:
    """Write ``rows`` as a catalogue CSV file (UTF-8, ``\\n`` line ends) atomically; return path.

    The file starts with ``# synthetic:``, ``# real:``, ``# licence:`` and ``# seed:`` comment
    lines when any row is synthetic (see :func:`catalogue_csv` for the seed rule and errors).
    The same rows always give the same bytes; :func:`settlement.catalogue.load_catalogue` reads
    them back into equal items.
    """
    text = catalogue_csv(rows, seed=seed)
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


#: med_type codes of inpatient visits (21 general, 22 injury, 23 referral, 24 emergency to
#: inpatient, 25 other region, 26 single disease, 52 maternity inpatient); all others are
#: treated as outpatient.
INPATIENT_MED_TYPES = frozenset({"21", "22", "23", "24", "25", "26", "52"})
_ID_PART = re.compile(r"[0-9A-Za-z]{1,20}")
MDTRT_ID_MAX = 30


def is_inpatient(med_type: str) -> bool:
    """True for inpatient visit types (:data:`INPATIENT_MED_TYPES`, or any 2xxx sub-type)."""
    return med_type in INPATIENT_MED_TYPES or (len(med_type) == 4 and med_type[:2] in
                                               INPATIENT_MED_TYPES)


class HisSimulator:
    """Makes itemised bills from a catalogue, like a hospital cashier's HIS would.

    ``catalogue``: a :class:`~settlement.catalogue.Catalogue` or any iterable of
    :class:`CatalogueItem`; only items with a list price (``pric``) are billed. ``seed`` seeds the
    simulator's own ``random.Random``, used when :meth:`make_bill` is given no rng. Raises
    ``ValueError`` when no item has a price.
    """

    def __init__(self, catalogue: Iterable[CatalogueItem], seed: int) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError("seed must be an int")
        self.items: tuple[CatalogueItem, ...] = tuple(i for i in catalogue if i.pric is not None)
        if not self.items:
            raise ValueError("the catalogue has no priced items to bill")
        self.outpatient_items = tuple(i for i in self.items if not i.inpatient_only)
        self.seed = seed
        self.rng = random.Random(seed)

    def make_bill(self, mdtrt_id: str, rng: random.Random | None = None, med_type: str = "11",
                  lines_min: int = 1, lines_max: int = 8) -> list[dict[str, str]]:
        """One bill for visit ``mdtrt_id``: ``lines_min..lines_max`` lines of distinct items.

        Each line is a dict of strings: ``feedetl_sn`` ("1", "2", ... in order), ``hilist_code``,
        ``name``, ``chrgitm_lv`` ("A"/"B"/"C"), ``pric`` (unit price, yuan decimal string such as
        "0.415" or "12.50"), ``cnt`` (quantity, integer decimal string: drugs 1..30 units, 1..5
        when dearer than 100 yuan; services 1..3; materials 1..2), ``selfpay_prop`` (class B
        only, e.g. "0.10") and ``pric_uplmt_amt`` (yuan, only when the item has a ceiling).
        Outpatient visits (``med_type`` not inpatient, see :func:`is_inpatient`) never get
        inpatient-only items. ``rng`` defaults to the simulator's own.

        Raises ``ValueError`` for an empty ``mdtrt_id``, a malformed ``med_type`` (2 or 4 digits),
        bad line bounds (1 <= lines_min <= lines_max) or fewer eligible items than ``lines_min``.
        """
        if not isinstance(mdtrt_id, str) or not mdtrt_id.strip():
            raise ValueError("mdtrt_id must be a non-empty string")
        if not isinstance(med_type, str) or not re.fullmatch(r"\d{2}|\d{4}", med_type):
            raise ValueError(f"med_type {med_type!r} must be 2 or 4 digits (e.g. '11', '21')")
        if not (isinstance(lines_min, int) and isinstance(lines_max, int)
                and 1 <= lines_min <= lines_max):
            raise ValueError("need 1 <= lines_min <= lines_max")
        rng = self.rng if rng is None else rng
        pool = self.items if is_inpatient(med_type) else self.outpatient_items
        if len(pool) < lines_min:
            raise ValueError(f"only {len(pool)} items can be billed for med_type {med_type}, "
                             f"fewer than lines_min={lines_min}")
        count = min(rng.randint(lines_min, lines_max), len(pool))
        lines = []
        for sn, item in enumerate(rng.sample(pool, count), start=1):
            low, high = QUANTITY[item.kind]
            if item.kind == "drug" and item.pric is not None and item.pric * 1000 > DRUG_DEAR_LI:
                low, high = DRUG_DEAR_QUANTITY
            line = {
                "feedetl_sn": str(sn),
                "hilist_code": item.hilist_code,
                "name": item.name,
                "chrgitm_lv": item.chrgitm_lv,
                "pric": str(item.pric),
                "cnt": str(rng.randint(low, high)),
            }
            if item.chrgitm_lv == "B":
                line["selfpay_prop"] = str(item.selfpay_prop)
            if item.pric_uplmt_amt is not None:
                line["pric_uplmt_amt"] = str(item.pric_uplmt_amt)
            lines.append(line)
        return lines

    @staticmethod
    def visit_id(clinic_code: str, n: int) -> str:
        """The visit id (``mdtrt_id``) of the clinic's ``n``-th visit: clinic code + 10 digits.

        ``visit_id("H33030200001", 7) == "H330302000010000000007"``. Raises ``ValueError`` for a
        clinic code that is not 1..20 letters/digits or ``n`` outside 0..9999999999.
        """
        if not isinstance(clinic_code, str) or not _ID_PART.fullmatch(clinic_code):
            raise ValueError(f"clinic_code {clinic_code!r} must be 1..20 letters or digits")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 10**10:
            raise ValueError("n must be an int in 0..9999999999")
        return f"{clinic_code}{n:010d}"

    @staticmethod
    def charge_batch_no(mdtrt_id: str, n: int = 1) -> str:
        """The charge batch number (``chrg_bchno``) of the visit's ``n``-th bill: ``{mdtrt_id}-NN``.

        One bill = one batch; a retry of the same bill must reuse its number, since the same
        (visit, charge batch) must give back the first settlement. Raises ``ValueError`` for an
        empty id or ``n`` outside 1..99.
        """
        if not isinstance(mdtrt_id, str) or not mdtrt_id.strip():
            raise ValueError("mdtrt_id must be a non-empty string")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 99:
            raise ValueError("n must be an int in 1..99")
        return f"{mdtrt_id}-{n:02d}"
