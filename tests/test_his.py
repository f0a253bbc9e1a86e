"""simulators.his: the synthetic catalogue generated from the real sample, and HIS bills."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import tempfile
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.money import to_decimal
from settlement.catalogue import Catalogue, CatalogueError, load_catalogue
from simulators.his import (SAMPLE_CSV, SELFPAY_PROPS, HisSimulator, catalogue_csv,
                            generate_catalogue, is_inpatient, write_catalogue)

DATA = Path(__file__).resolve().parents[1] / "simulators" / "data"
SHARED = Path("/work/shared/data")


def sample_rows() -> list[dict[str, str]]:
    with open(SAMPLE_CSV, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def rows42():
    return generate_catalogue(SAMPLE_CSV, 42)


@pytest.fixture(scope="module")
def catalogue42(rows42, tmp_path_factory):
    path = tmp_path_factory.mktemp("cat") / "catalogue.csv"
    write_catalogue(rows42, path)
    return load_catalogue(path)


def decimals(value: Decimal) -> int:
    return max(0, -value.as_tuple().exponent)  # type: ignore[operator]


# ---------------------------------------------------------------- the shipped sample

@pytest.mark.parametrize("name", ["catalogue-sample.csv", "README.md"])
def test_data_files_are_byte_copies_of_the_shared_ones(name):
    ours = (DATA / name).read_bytes()
    assert ours, name
    if not (SHARED / name).exists():
        pytest.skip("/work/shared is not on this machine")
    assert ours == (SHARED / name).read_bytes()


def test_sample_is_the_323_real_rows():
    rows = sample_rows()
    assert len(rows) == 323 and len({r["code"] for r in rows}) == 323
    assert Counter(r["kind"] for r in rows) == {"drug": 151, "service": 132, "material": 40}
    assert SAMPLE_CSV == DATA / "catalogue-sample.csv"


# ---------------------------------------------------------------- generate_catalogue

def test_generation_is_deterministic_by_seed(rows42):
    again = generate_catalogue(SAMPLE_CSV, 42)
    assert again == rows42 and again.seed == 42
    assert catalogue_csv(again) == catalogue_csv(rows42)
    other = generate_catalogue(SAMPLE_CSV, 43)
    assert [r.hilist_code for r in other] == [r.hilist_code for r in rows42]
    assert other != rows42


def test_real_columns_unchanged_and_all_codes_covered(rows42):
    sample = sample_rows()
    assert [r.hilist_code for r in rows42] == [s["code"] for s in sample]
    for item, src in zip(rows42, sample):
        assert (item.name, item.kind, item.restriction, item.source) == (
            src["name"], src["kind"], src["restriction"], src["source"])
        assert item.synthetic


def test_every_item_has_a_valid_class_ratio_price_unit(rows42):
    for item in rows42:
        assert item.chrgitm_lv in ("A", "B", "C")
        if item.chrgitm_lv == "B":
            assert str(item.selfpay_prop) in SELFPAY_PROPS
        else:
            assert item.selfpay_prop == 0
        assert isinstance(item.pric, Decimal) and item.pric > 0
        assert decimals(item.pric) in ((2, 3) if item.kind == "drug" else (2,))
        if item.pric_uplmt_amt is not None:
            assert item.chrgitm_lv == "B"
            assert Decimal("0.01") <= item.pric_uplmt_amt < item.pric
            assert decimals(item.pric_uplmt_amt) == 2
        assert item.unit
        if item.kind == "service":
            assert item.unit in ("次", "项")
        if item.kind == "material":
            assert item.unit == "个"
        assert not any(isinstance(getattr(item, f.name), float) for f in dataclasses.fields(item))


def test_drug_units_follow_the_name(rows42):
    by_code = {r.hilist_code: r for r in rows42}
    assert by_code["ZA05CAC0029010102312"].unit == "支"   # 参附注射液
    assert by_code["XG04CBA088A001010101467"].unit == "片"  # 爱普列特片
    assert by_code["XJ02ACA397E001010184811"].unit == "粒"  # 奥特康唑胶囊


def test_work_injury_and_maternity_items_are_class_c():
    for seed in range(5):
        rows = generate_catalogue(SAMPLE_CSV, seed)
        only = [r for r in rows if r.insurance_only is not None]
        assert len(only) == 12  # 9 工伤 + 3 生育 in the sample
        assert all(r.chrgitm_lv == "C" and not r.basic_insurance_payable for r in only)


def test_shares_are_roughly_as_intended():
    counts: Counter = Counter()
    ceilings = b_items = three_decimals = drugs = 0
    for seed in range(20):
        for r in generate_catalogue(SAMPLE_CSV, seed):
            if r.insurance_only is None:
                counts[r.chrgitm_lv] += 1
            if r.chrgitm_lv == "B":
                b_items += 1
                ceilings += r.pric_uplmt_amt is not None
            if r.kind == "drug":
                drugs += 1
                three_decimals += decimals(r.pric) == 3
    total = sum(counts.values())
    assert 0.45 < counts["A"] / total < 0.55
    assert 0.30 < counts["B"] / total < 0.40
    assert 0.10 < counts["C"] / total < 0.20
    assert 0.13 < ceilings / b_items < 0.27
    assert 0.2 < three_decimals / drugs < 0.4
    assert any(decimals(r.pric) == 3 and r.pric < 1 for r in generate_catalogue(SAMPLE_CSV, 1))


def test_restriction_hints_on_generated_items(rows42):
    by_code = {r.hilist_code: r for r in rows42}
    assert by_code["ZA09HAC0101010102129"].hospital_level_min == 2    # 限二级及以上医疗机构
    assert by_code["003310050180000"].hospital_level_min == 3         # 肝移植术 机构限制=三级
    assert by_code["002202010060000"].sex == "F"                      # 性别限制=女
    assert by_code["ZD01CAA0063010104080"].sex == "F"                 # 限定性别对象:女
    assert by_code["XB05BAF150B002010100269"].inpatient_only          # 限定就医方式:住院
    assert by_code["XJ06AAA006B001010178976"].insurance_only == "work_injury"  # 工伤
    assert by_code["ZD01BAY0323010102065"].insurance_only == "maternity"       # 生育
    assert by_code["ZA06CAJ0512010101463"].age_max == 17              # 限定年龄对象:儿童


# ---------------------------------------------------------------- write_catalogue

def test_written_file_says_what_is_synthetic_and_reads_back(rows42, tmp_path):
    path = write_catalogue(rows42, tmp_path / "c.csv")
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    assert first.startswith("# synthetic:") and "SYNTHETIC" in first and "seed 42" in first
    for column in ("chrgitm_lv", "selfpay_prop", "pric", "pric_uplmt_amt", "unit"):
        assert column in first
    assert "jdzwq/MediModel" in text and "573b603d13a83f8e8d44d054aa0da80e8afd048e" in text
    assert "# seed: 42" in text
    loaded = load_catalogue(path)
    assert loaded.synthetic and loaded.meta["seed"] == "42"
    assert list(loaded) == list(rows42) and len(loaded) == 323
    assert path.read_bytes() == write_catalogue(loaded, tmp_path / "d.csv", seed=42).read_bytes()
    assert not list(tmp_path.glob(".c.csv.*"))  # no temporary file left behind


def test_synthetic_rows_need_a_seed_to_be_written(rows42, tmp_path):
    with pytest.raises(ValueError, match="seed"):
        write_catalogue(list(rows42), tmp_path / "c.csv")
    assert not (tmp_path / "c.csv").exists()
    with pytest.raises(CatalogueError, match="duplicate"):
        write_catalogue([rows42[0], rows42[0]], tmp_path / "c.csv", seed=1)


def test_generate_refuses_a_bad_sample_and_seed(tmp_path):
    bad = tmp_path / "sample.csv"
    bad.write_text("code,name,kind,chrgitm_lv,unit,price_yuan,restriction,source\n"
                   "X1,药,drug,,,,,s\nX1,药,drug,,,,,s\n", encoding="utf-8")
    with pytest.raises(CatalogueError, match="line 3.*duplicate"):
        generate_catalogue(bad, 1)
    with pytest.raises(TypeError):
        generate_catalogue(SAMPLE_CSV, "1")  # type: ignore[arg-type]


# ---------------------------------------------------------------- HisSimulator

def test_bill_lines_are_json_ready_and_match_the_catalogue(catalogue42):
    his = HisSimulator(catalogue42, seed=5)
    rng = random.Random(9)
    for n in range(200):
        mdtrt_id = his.visit_id("H33030200001", n)
        bill = his.make_bill(mdtrt_id, rng, med_type="21", lines_min=2, lines_max=6)
        assert 2 <= len(bill) <= 6
        assert [line["feedetl_sn"] for line in bill] == [str(i) for i in range(1, len(bill) + 1)]
        assert len({line["hilist_code"] for line in bill}) == len(bill)
        assert json.loads(json.dumps(bill, ensure_ascii=False)) == bill
        for line in bill:
            item = catalogue42.get(line["hilist_code"])
            assert all(isinstance(v, str) for v in line.values())
            assert line["name"] == item.name and line["chrgitm_lv"] == item.chrgitm_lv
            assert to_decimal(line["pric"]) == item.pric
            cnt = to_decimal(line["cnt"])
            low, high = {"drug": (1, 30), "service": (1, 3), "material": (1, 2)}[item.kind]
            assert low <= cnt <= high and cnt == cnt.to_integral_value()
            assert ("selfpay_prop" in line) == (item.chrgitm_lv == "B")
            if "selfpay_prop" in line:
                assert to_decimal(line["selfpay_prop"]) == item.selfpay_prop
            assert ("pric_uplmt_amt" in line) == (item.pric_uplmt_amt is not None)
            if "pric_uplmt_amt" in line:
                assert to_decimal(line["pric_uplmt_amt"]) == item.pric_uplmt_amt


def test_outpatient_bills_skip_inpatient_only_items(catalogue42):
    his = HisSimulator(catalogue42, seed=1)
    rng = random.Random(2)
    inpatient_only = {i.hilist_code for i in catalogue42 if i.inpatient_only}
    assert len(inpatient_only) == 43
    seen_in_outpatient: set[str] = set()
    seen_in_inpatient: set[str] = set()
    for n in range(300):
        for med_type in ("11", "13", "14"):
            seen_in_outpatient |= {line["hilist_code"] for line in
                                   his.make_bill(f"V{n}", rng, med_type=med_type)}
        seen_in_inpatient |= {line["hilist_code"] for line in
                              his.make_bill(f"V{n}", rng, med_type="21")}
    assert not seen_in_outpatient & inpatient_only
    assert seen_in_inpatient & inpatient_only  # inpatients do get them
    assert is_inpatient("21") and is_inpatient("2101") and is_inpatient("52")
    assert not is_inpatient("11") and not is_inpatient("51")


def test_bills_are_deterministic_by_rng(catalogue42):
    his = HisSimulator(catalogue42, seed=3)
    assert his.make_bill("V1", random.Random(7)) == his.make_bill("V1", random.Random(7))
    a, b = HisSimulator(catalogue42, seed=3), HisSimulator(catalogue42, seed=3)
    assert [a.make_bill("V1") for _ in range(5)] == [b.make_bill("V1") for _ in range(5)]


def test_dear_drugs_come_in_few_units(catalogue42):
    his = HisSimulator(catalogue42, seed=3)
    rng = random.Random(11)
    for _ in range(300):
        for line in his.make_bill("V", rng, med_type="21", lines_max=8):
            item = catalogue42.get(line["hilist_code"])
            if item.kind == "drug" and item.pric > 100:
                assert 1 <= int(line["cnt"]) <= 5


def test_visit_id_and_charge_batch_no():
    assert HisSimulator.visit_id("H33030200001", 7) == "H330302000010000000007"
    mdtrt_id = HisSimulator.visit_id("H33030200001", 123)
    assert len(mdtrt_id) <= 30
    assert HisSimulator.charge_batch_no(mdtrt_id) == mdtrt_id + "-01"
    assert HisSimulator.charge_batch_no(mdtrt_id, 12) == mdtrt_id + "-12"
    for clinic, n in [("", 1), ("H 1", 1), ("H" * 21, 1), ("H1", -1), ("H1", 10**10),
                      ("H1", True)]:
        with pytest.raises(ValueError):
            HisSimulator.visit_id(clinic, n)
    for mdtrt_id, n in [("", 1), ("V", 0), ("V", 100)]:
        with pytest.raises(ValueError):
            HisSimulator.charge_batch_no(mdtrt_id, n)


@pytest.mark.parametrize("kwargs", [
    dict(mdtrt_id=""), dict(med_type="1"), dict(med_type="outpatient"),
    dict(lines_min=0), dict(lines_min=5, lines_max=4),
    dict(lines_min=400, lines_max=400),
])
def test_make_bill_refuses_bad_arguments(catalogue42, kwargs):
    his = HisSimulator(catalogue42, seed=1)
    args = dict(mdtrt_id="V1", rng=random.Random(1), med_type="11", lines_min=1, lines_max=8)
    args.update(kwargs)
    with pytest.raises(ValueError):
        his.make_bill(**args)


def test_simulator_needs_priced_items(catalogue42):
    unpriced = [dataclasses.replace(i, pric=None) for i in list(catalogue42)[:3]]
    with pytest.raises(ValueError, match="no priced items"):
        HisSimulator(Catalogue(unpriced), seed=1)


# ---------------------------------------------------------------- properties

def walk(value):
    """Every leaf of a JSON-like structure."""
    if isinstance(value, dict):
        for v in value.values():
            yield from walk(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from walk(v)
    else:
        yield value


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**64))
def test_any_seed_gives_a_loadable_catalogue(seed):
    rows = generate_catalogue(SAMPLE_CSV, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_catalogue(rows, Path(tmp) / "catalogue.csv")
        loaded = load_catalogue(path)
    assert list(loaded) == list(rows) and len(loaded) == 323
    assert loaded.meta["seed"] == str(seed)


@settings(max_examples=60, deadline=None)
@given(catalogue_seed=st.integers(min_value=0, max_value=50),
       bill_seed=st.integers(min_value=0, max_value=2**32),
       med_type=st.sampled_from(["11", "12", "13", "14", "21", "24", "51", "52"]),
       bounds=st.tuples(st.integers(1, 10), st.integers(0, 10)))
def test_any_bill_is_well_formed(catalogue_seed, bill_seed, med_type, bounds):
    lines_min, extra = bounds
    rows = _catalogue_for(catalogue_seed)
    his = HisSimulator(rows, seed=catalogue_seed)
    bill = his.make_bill(HisSimulator.visit_id("H33030200001", bill_seed % 10**10),
                         random.Random(bill_seed), med_type=med_type,
                         lines_min=lines_min, lines_max=lines_min + extra)
    assert lines_min <= len(bill) <= lines_min + extra
    serials = [line["feedetl_sn"] for line in bill]
    assert len(set(serials)) == len(serials)
    assert all(type(leaf) is str for leaf in walk(bill))  # no float (nor int) anywhere
    by_code = {r.hilist_code: r for r in rows}
    for line in bill:
        assert to_decimal(line["cnt"]) > 0
        assert to_decimal(line["pric"]) > 0
        for key in ("selfpay_prop", "pric_uplmt_amt"):
            if key in line:
                to_decimal(line[key])
        if not is_inpatient(med_type):
            assert not by_code[line["hilist_code"]].inpatient_only


_CACHE: dict[int, list] = {}


def _catalogue_for(seed: int) -> list:
    if seed not in _CACHE:
        _CACHE[seed] = generate_catalogue(SAMPLE_CSV, seed)
    return _CACHE[seed]
