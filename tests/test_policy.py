"""Policy books: the built-in files load, lookups work, and every kind of bad file is refused."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from settlement.policy import (
    Policy,
    PolicyError,
    PolicyNotFound,
    PolicyShelf,
    PolicyYearMissing,
    builtin_names,
    load_builtin,
    load_policy_book,
)

GOOD = '''
[book]
name = "bad"
region = "TEST"
year = 2026
verified = false
source = "unit test"

[defaults]
acct_scope = "all_personal_part"
annual_cap_fen = 1000000

[defaults.outpatient]
deductible_per_year_fen = 60000

[defaults.inpatient]
deductible_per_admission_fen = 80000
deductible_ratio_2nd_admission = "0.50"
deductible_ratio_3rd_plus_admission = "0.00"

[[rows]]
insutype = "310"
retired = false
hospital_tier = 2
med_type = "11"
fund_ratio = "0.70"

[[rows]]
insutype = "310"
retired = false
hospital_tier = 2
med_type = "21"
fund_ratio = "0.85"
'''

ROW0 = 'insutype = "310"\nretired = false\nhospital_tier = 2\nmed_type = "11"\nfund_ratio = "0.70"\n'


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_good_file_loads_with_inherited_defaults(tmp_path):
    book = load_policy_book(_write(tmp_path, GOOD))
    assert (book.name, book.region, book.year, book.verified, len(book)) == ("bad", "TEST", 2026, False, 2)
    out = book.find("310", False, 2, "11")
    assert out.deductible_per_year_fen == 60000 and out.deductible_per_admission_fen is None
    assert out.fund_ratio == Decimal("0.70") and isinstance(out.fund_ratio, Decimal)
    inp = book.find("310", False, 2, "21")
    assert inp.deductible_per_admission_fen == 80000 and inp.deductible_per_year_fen is None
    assert inp.deductible_ratio_2nd_admission == Decimal("0.50")
    assert inp.is_inpatient and not out.is_inpatient


def test_row_overrides_kind_defaults_which_override_defaults(tmp_path):
    text = GOOD.replace(ROW0, ROW0 + "deductible_per_year_fen = 100\nannual_cap_fen = 5\n")
    policy = load_policy_book(_write(tmp_path, text)).find("310", False, 2, "11")
    assert (policy.deductible_per_year_fen, policy.annual_cap_fen) == (100, 5)


def test_list_valued_keys_expand_to_one_row_each(tmp_path):
    text = GOOD.replace('hospital_tier = 2\nmed_type = "11"', 'hospital_tier = [1, 2, 3]\nmed_type = ["11", "13"]')
    book = load_policy_book(_write(tmp_path, text))
    assert len(book) == 7
    assert book.find("310", False, 3, "13").fund_ratio == Decimal("0.70")


BAD_CASES = [
    # (id, old text, new text, expected message fragment)
    ("ratio above 1", 'fund_ratio = "0.70"', 'fund_ratio = "1.2"', "bad.toml: rows[0].fund_ratio: 1.2 is outside 0..1"),
    ("ratio below 0", 'fund_ratio = "0.70"', 'fund_ratio = "-0.1"', "rows[0].fund_ratio: -0.1 is outside 0..1"),
    ("ratio as TOML float", 'fund_ratio = "0.70"', "fund_ratio = 0.70", "rows[0].fund_ratio: 0.7 is a float"),
    ("ratio not a number", 'fund_ratio = "0.70"', 'fund_ratio = "seventy"', "rows[0].fund_ratio"),
    ("ratio as bool", 'fund_ratio = "0.70"', "fund_ratio = true", "rows[0].fund_ratio"),
    ("negative deductible", ROW0, ROW0 + "deductible_per_year_fen = -1\n",
     "rows[0].deductible_per_year_fen: -1 is negative"),
    ("deductible as float", ROW0, ROW0 + "deductible_per_year_fen = 600.0\n",
     "rows[0].deductible_per_year_fen: 600.0 is a float"),
    ("deductible as string", ROW0, ROW0 + 'deductible_per_year_fen = "60000"\n',
     "rows[0].deductible_per_year_fen: expected an integer number of fen"),
    ("negative cap", ROW0, ROW0 + "annual_cap_fen = -5\n", "rows[0].annual_cap_fen: -5 is negative"),
    ("cap beyond the amount limit", ROW0, ROW0 + "annual_cap_fen = 10000000000000000\n",
     "rows[0].annual_cap_fen: 10000000000000000 is beyond the limit"),
    ("unknown acct_scope", 'acct_scope = "all_personal_part"', 'acct_scope = "anything"',
     "defaults.acct_scope: 'anything' is not an acct_scope"),
    ("unknown acct_scope in a row", ROW0, ROW0 + 'acct_scope = "cash_only"\n', "rows[0].acct_scope"),
    ("second-tier cap without ratio", ROW0, ROW0 + "serious_illness_cap_fen = 500\n",
     "rows[0].serious_illness_cap_fen: given without serious_illness_ratio"),
    ("second-tier ratio without cap", ROW0, ROW0 + 'serious_illness_ratio = "0.8"\n',
     "rows[0].serious_illness_ratio: given without serious_illness_cap_fen"),
    ("second-tier ratio outside 0..1", ROW0, ROW0 + 'serious_illness_ratio = "1.5"\nserious_illness_cap_fen = 5\n',
     "rows[0].serious_illness_ratio: 1.5 is outside 0..1"),
    ("admission ratio outside 0..1", 'deductible_ratio_2nd_admission = "0.50"', 'deductible_ratio_2nd_admission = "2"',
     "defaults.inpatient.deductible_ratio_2nd_admission: 2 is outside 0..1"),
    ("duplicate key", "[[rows]]", "[[rows]]\n" + ROW0 + "\n[[rows]]", "rows[1]: duplicate key (insutype=310 "
     "retired=false hospital_tier=2 med_type=11), already defined by rows[0]"),
    ("duplicate key through a list", 'hospital_tier = 2\nmed_type = "21"', 'hospital_tier = 2\nmed_type = ["21", "21"]',
     "rows[1].med_type[1]: '21' is listed twice"),
    ("missing fund_ratio", 'fund_ratio = "0.70"\n', "", "rows[0].fund_ratio: missing"),
    ("missing med_type", 'med_type = "11"\n', "", "rows[0].med_type: missing"),
    ("missing outpatient deductible", "deductible_per_year_fen = 60000", "",
     "rows[0].deductible_per_year_fen: missing"),
    ("missing admission ratio", 'deductible_ratio_3rd_plus_admission = "0.00"', "",
     "rows[1].deductible_ratio_3rd_plus_admission: missing"),
    ("yearly deductible on an inpatient row", 'med_type = "21"\n', 'med_type = "21"\ndeductible_per_year_fen = 1\n',
     "rows[1].deductible_per_year_fen: not allowed for inpatient"),
    ("per-admission deductible on an outpatient row", ROW0, ROW0 + "deductible_per_admission_fen = 1\n",
     "rows[0].deductible_per_admission_fen: not allowed for outpatient"),
    ("misspelt field", 'fund_ratio = "0.70"', 'fund_raito = "0.70"', "rows[0].fund_raito: unknown field"),
    ("hospital tier 4", "hospital_tier = 2\nmed_type = \"11\"", "hospital_tier = 4\nmed_type = \"11\"",
     "rows[0].hospital_tier: 4 is not a hospital tier"),
    ("unknown med_type", 'med_type = "11"', 'med_type = "99"', "rows[0].med_type: '99' is not a known med_type"),
    ("insutype as a number", 'insutype = "310"\nretired = false\nhospital_tier = 2\nmed_type = "11"',
     'insutype = 310\nretired = false\nhospital_tier = 2\nmed_type = "11"', "rows[0].insutype"),
    ("retired as a string", 'retired = false\nhospital_tier = 2\nmed_type = "11"',
     'retired = "no"\nhospital_tier = 2\nmed_type = "11"', "rows[0].retired: expected true or false"),
    ("book without verified", "verified = false\n", "", "bad.toml: book.verified: missing"),
    ("no book table", "[book]", "[bookk]", "bad.toml: bookk: unknown top-level table"),
    ("year not a number", "year = 2026", 'year = "2026"', "book.year"),
    ("no rows", GOOD[GOOD.index("[[rows]]"):], "", "rows: missing"),
    ("last year before year", "year = 2026\n", "year = 2026\nlast_year = 2025\n",
     "bad.toml: book.last_year: 2025 is before book.year 2026"),
    ("last year not a year", "year = 2026\n", "year = 2026\nlast_year = \"2027\"\n",
     "bad.toml: book.last_year: '2027' is not an insurance year"),
    ("not TOML", "[book]", "[book", "bad.toml: not valid TOML"),
    ("unknown defaults kind", "[defaults.outpatient]\ndeductible_per_year_fen = 60000",
     "[defaults.inpatient_x]", "bad.toml: defaults.inpatient_x: unknown field"),
    ("defaults for a kind not a table", "annual_cap_fen = 1000000\n\n[defaults.outpatient]\ndeductible_per_year_fen = 60000",
     "annual_cap_fen = 1000000\noutpatient = 3", "bad.toml: defaults.outpatient: expected a table"),
]


@pytest.mark.parametrize("old, new, fragment", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_files_are_refused_naming_the_field(tmp_path, old, new, fragment):
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(PolicyError) as info:
        load_policy_book(path)
    message = str(info.value)
    assert fragment in message
    assert message.startswith("bad.toml: ")
    assert "\n" not in message


def test_policy_error_is_a_value_error_and_not_found_a_lookup_error():
    assert issubclass(PolicyError, ValueError)
    assert issubclass(PolicyNotFound, LookupError)


def test_find_names_the_missing_key():
    book = load_builtin("test-policy-P")
    with pytest.raises(PolicyNotFound) as info:
        book.find("310", False, 2, "51")
    assert "test-policy-P.toml" in str(info.value)
    assert "insutype=310 retired=false hospital_tier=2 med_type=51" in str(info.value)


def test_builtin_books():
    assert {"test-policy-P", "zj-wenzhou-2026-placeholder"} <= set(builtin_names())
    p = load_builtin("test-policy-P.toml").find("310", False, 2, "11")
    assert p.name == "test-policy-P" and p.deductible_per_year_fen == 60000
    assert p.fund_ratio == Decimal("0.70") and p.annual_cap_fen == 1000000 and p.acct_scope == "all_personal_part"
    with pytest.raises(PolicyNotFound):
        load_builtin("../etc/passwd")
    with pytest.raises(PolicyNotFound):
        load_builtin("no-such-book")


@pytest.mark.parametrize("name", ["test-policy-P", "zj-wenzhou-2026-placeholder"])
def test_builtin_books_cover_a_demo(name):
    book = load_builtin(name)
    for insutype in ("310", "390"):
        for retired in (False, True):
            for tier in (1, 2, 3):
                for med_type in ("11", "13", "14", "21", "24"):
                    policy = book.find(insutype, retired, tier, med_type)
                    assert policy.verified is False


def test_placeholder_says_so():
    path = Path(__file__).parents[1] / "settlement" / "policies" / "zj-wenzhou-2026-placeholder.toml"
    head = path.read_text(encoding="utf-8").splitlines()[0]
    assert "UNVERIFIED PLACEHOLDER" in head
    book = load_builtin("zj-wenzhou-2026-placeholder")
    assert book.verified is False and "PLACEHOLDER" in book.source


def test_policy_object_validates_itself():
    base = dict(name="x", insutype="310", retired=False, hospital_tier=1, med_type="11",
                fund_ratio=Decimal("0.7"), annual_cap_fen=1, acct_scope="all_personal_part",
                deductible_per_year_fen=0)
    assert Policy(**base).fund_ratio == Decimal("0.7")
    assert Policy(**{**base, "fund_ratio": "0.7"}).fund_ratio == Decimal("0.7")
    with pytest.raises(PolicyError, match="fund_ratio: 0.7 is a float"):
        Policy(**{**base, "fund_ratio": 0.7})
    with pytest.raises(PolicyError, match="hospital_tier"):
        Policy(**{**base, "hospital_tier": True})
    with pytest.raises(PolicyError, match="deductible_per_year_fen: missing"):
        Policy(**{**base, "deductible_per_year_fen": None})


def _book_for_years(tmp_path, year: int, last_year: int | None, name: str):
    text = GOOD.replace("year = 2026\n", f"year = {year}\n" + (f"last_year = {last_year}\n" if last_year else ""), 1)
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return load_policy_book(path)


def test_a_shelf_gives_each_insurance_year_its_own_book_and_refuses_the_others(tmp_path):
    old = _book_for_years(tmp_path, 2025, None, "y2025")
    now = _book_for_years(tmp_path, 2026, 2027, "y2026")
    assert (old.years_text, now.years_text) == ("2025", "2026-2027")
    shelf = PolicyShelf([now, old])
    assert [b.origin for b in shelf] == ["y2025.toml", "y2026.toml"]
    assert shelf.book_for(2025) is old and shelf.book_for(2026) is now and shelf.book_for(2027) is now
    assert shelf.find("310", False, 2, "11", 2027) == now.find("310", False, 2, "11")
    for year in (2024, 2028):
        with pytest.raises(PolicyYearMissing) as info:
            shelf.find("310", False, 2, "11", year)
        assert str(info.value).startswith(f"no policy book covers insurance year {year} "
                                          "(loaded: y2025.toml (2025), y2026.toml (2026-2027))")
    assert issubclass(PolicyYearMissing, PolicyNotFound)
    with pytest.raises(PolicyError) as twice:
        PolicyShelf([now, _book_for_years(tmp_path, 2027, None, "y2027")])
    assert str(twice.value) == "y2026.toml and y2027.toml both cover insurance year 2027"
    with pytest.raises(PolicyError):
        PolicyShelf([])


def test_the_engine_loads_books_named_by_commas_and_refuses_a_bad_list(tmp_path):
    from api.bootstrap import load_policies
    from ledger.errors import Invalid

    a = _book_for_years(tmp_path, 2025, None, "y2025")
    shelf = load_policies(f"{tmp_path / 'y2025.toml'}, test-policy-P")
    assert [b.name for b in shelf] == [a.name, "test-policy-P"]
    assert shelf.book_for(2099).name == "test-policy-P"
    for bad, fragment in ((f"{tmp_path / 'y2025.toml'},{tmp_path / 'y2025.toml'}", "both cover insurance year 2025"),
                          ("test-policy-P,nope", "no built-in policy book 'nope'"),
                          ("test-policy-P,", "'test-policy-P,': an empty name in the list"),
                          (f"{tmp_path / 'missing.toml'}", f"{tmp_path / 'missing.toml'}: no such policy file (a policy book is a .toml file)")):
        with pytest.raises(Invalid) as info:
            load_policies(bad)
        assert info.value.code == "policy_invalid" and fragment in info.value.detail


def test_a_books_digest_names_its_text_line_endings_aside(tmp_path):
    from settlement.policy import parse_policy_book

    lf = parse_policy_book(GOOD, "a.toml")
    assert len(lf.digest) == 16
    assert parse_policy_book(GOOD.replace("\n", "\r\n"), "b.toml").digest == lf.digest
    assert parse_policy_book(GOOD.replace("annual_cap_fen = 1000000", "annual_cap_fen = 1000001"), "c.toml").digest \
        != lf.digest
