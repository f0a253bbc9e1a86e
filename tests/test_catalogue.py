"""settlement.catalogue: restriction hints, the CatalogueItem invariants and the file loader."""

from __future__ import annotations

import csv
import dataclasses
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from settlement.catalogue import (COLUMNS, Catalogue, CatalogueError, CatalogueItem,
                                  RestrictionHints, UnknownItem, load_catalogue,
                                  parse_catalogue, parse_restriction)

SAMPLE = Path(__file__).resolve().parents[1] / "simulators" / "data" / "catalogue-sample.csv"


def sample_restrictions() -> dict[str, str]:
    with open(SAMPLE, encoding="utf-8", newline="") as handle:
        return {row["code"]: row["restriction"] for row in csv.DictReader(handle)}


# (code of a real sample row, what it is, expected hints)
REAL_EXAMPLES = [
    ("ZA05CAC0029010102312", "参附注射液 限定机构等级:二级｜限二级及以上医疗机构。",
     RestrictionHints(hospital_level_min=2)),
    ("XA10BJD332B002010178403", "度拉糖肽: 二级, text starts with 限二甲双胍 (not a level)",
     RestrictionHints(hospital_level_min=2)),
    ("XS01LXD085J005010178976", "机构等级 三级 wins over 二级 in the text; 50岁以上 is no age rule",
     RestrictionHints(hospital_level_min=3)),
    ("XS01LAA308G003010104021", "阿柏西普: 三级; '1.50岁以上' is an indication, not an age bound",
     RestrictionHints(hospital_level_min=3)),
    ("003304070020000", "玻璃体切除术 机构限制=三级", RestrictionHints(hospital_level_min=3)),
    ("003313010030000", "卵巢修补术 性别限制=女", RestrictionHints(sex="F")),
    ("002101030280000", "阴茎海绵体造影 性别限制=男; 疾病限制=...", RestrictionHints(sex="M")),
    ("ZD03AAA0043010100166", "艾附暖宫丸 限定性别对象:女", RestrictionHints(sex="F")),
    ("XL02BBA326A001010102180", "阿帕他胺片 限定性别对象:男", RestrictionHints(sex="M")),
    ("XB05BAU005B002010101415", "ω-3鱼油脂肪乳注射液 限定就医方式:住院",
     RestrictionHints(inpatient_only=True)),
    ("001109000020100", "百级层流洁净病房床位费 就医限制=住院", RestrictionHints(inpatient_only=True)),
    ("XC02CXY168B002010100239", "银杏叶提取物注射液: 住院 only in the note, among alternatives",
     RestrictionHints()),
    ("ZH01AAB0066010100716", "疤痕止痒软化膏 限定保险类型:工伤",
     RestrictionHints(insurance_only="work_injury")),
    ("XG02ADD082D003010179504", "地诺前列酮栓 限定保险类型:生育",
     RestrictionHints(insurance_only="maternity")),
    ("ZA04CAE0023010100166", "儿童清肺口服液 限定年龄对象:儿童", RestrictionHints(age_min=0, age_max=17)),
    ("001301000010000", "婴幼儿健康体检 年龄限制=婴幼儿", RestrictionHints(age_min=0, age_max=2)),
    ("001201000070000", "新生儿护理 年龄限制=新生儿", RestrictionHints(age_min=0, age_max=0)),
    ("003111000010000", "小儿包茎气囊导管扩张术 性别限制=男; 年龄限制=儿童",
     RestrictionHints(sex="M", age_min=0, age_max=17)),
    ("003401000090200", "低频脉冲治疗: disease/frequency/course only", RestrictionHints()),
    ("C020101052", "material: no restriction", RestrictionHints()),
]


@pytest.mark.parametrize("code,what,expected", REAL_EXAMPLES, ids=[e[0] for e in REAL_EXAMPLES])
def test_hints_of_real_sample_rows(code, what, expected):
    text = sample_restrictions()[code]
    assert parse_restriction(text) == expected, what


@pytest.mark.parametrize("text,expected", [
    ("限二级及以上医疗机构", RestrictionHints(hospital_level_min=2)),
    ("限三级及以上医疗机构使用", RestrictionHints(hospital_level_min=3)),
    ("机构限制=三级", RestrictionHints(hospital_level_min=3)),
    ("限女性患者。", RestrictionHints(sex="F")),
    ("性别限制=女; 频次限制=1次每日", RestrictionHints(sex="F")),
    ("限儿童", RestrictionHints(age_min=0, age_max=17)),
    ("限儿童患者。", RestrictionHints(age_min=0, age_max=17)),
    # Civil Code art. 1259: 以下/以上 include the number, 未满/不满 exclude it.
    ("限18岁以下", RestrictionHints(age_max=18)),
    ("限18周岁以下的患者。", RestrictionHints(age_max=18)),
    ("限未满18周岁", RestrictionHints(age_max=17)),
    ("限60岁以上患者", RestrictionHints(age_min=60)),
    ("年龄限制=老年人", RestrictionHints(age_min=60)),
    ("限定就医方式:住院｜限急诊或住院患者。", RestrictionHints(inpatient_only=True)),
    ("限定保险类型:生育｜生育保险目录用药", RestrictionHints(insurance_only="maternity")),
    ("", RestrictionHints()),
    ("限：1.50岁以上的湿性年龄相关性黄斑变性", RestrictionHints()),
])
def test_hints_of_plain_texts(text, expected):
    assert parse_restriction(text) == expected


@given(st.text(max_size=80))
def test_parse_restriction_never_raises_on_text(text):
    hints = parse_restriction(text)
    assert hints.sex in (None, "M", "F")
    assert hints.hospital_level_min in (None, 1, 2, 3)


# ---------------------------------------------------------------- CatalogueItem, Catalogue

def item(**overrides) -> CatalogueItem:
    fields = dict(hilist_code="X1", name="阿莫西林胶囊", kind="drug", chrgitm_lv="B",
                  selfpay_prop=Decimal("0.10"), pric_uplmt_amt=Decimal("1.00"), unit="粒",
                  restriction="限定机构等级:二级｜限二级及以上医疗机构。", pric=Decimal("1.415"))
    fields.update(overrides)
    return CatalogueItem(**fields)


def test_item_derives_hints_and_is_frozen():
    it = item()
    assert it.hospital_level_min == 2 and it.sex is None and not it.inpatient_only
    assert it.basic_insurance_payable
    assert it.hints == RestrictionHints(hospital_level_min=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        it.chrgitm_lv = "A"  # type: ignore[misc]
    with pytest.raises(TypeError):
        CatalogueItem(hilist_code="X", name="n", kind="drug", chrgitm_lv="A",  # type: ignore
                      selfpay_prop=Decimal(0), pric_uplmt_amt=None, unit="", sex="F")
    assert not item(restriction="限定保险类型:工伤｜工伤保险目录用药").basic_insurance_payable


@pytest.mark.parametrize("overrides,field", [
    (dict(selfpay_prop=0.1), "selfpay_prop"),
    (dict(pric=1.5), "pric"),
    (dict(pric_uplmt_amt=2.0), "pric_uplmt_amt"),
    (dict(chrgitm_lv="甲"), "chrgitm_lv"),
    (dict(kind="pill"), "kind"),
    (dict(selfpay_prop=Decimal("1.01")), "selfpay_prop"),
    (dict(chrgitm_lv="A", selfpay_prop=Decimal("0.10")), "selfpay_prop"),
    (dict(pric=Decimal("-1")), "pric"),
    (dict(pric=Decimal("NaN")), "pric"),
    (dict(pric_uplmt_amt=Decimal("0")), "pric_uplmt_amt"),
    (dict(hilist_code=" X1"), "hilist_code"),
    (dict(name=""), "name"),
])
def test_item_refuses_bad_values(overrides, field):
    with pytest.raises(CatalogueError) as err:
        item(**overrides)
    assert err.value.field == field
    assert field in str(err.value)


def test_catalogue_get_len_iter_and_unknown_item():
    a, b = item(hilist_code="A1"), item(hilist_code="B2", chrgitm_lv="C")
    cat = Catalogue([a, b])
    assert len(cat) == 2 and list(cat) == [a, b] and "A1" in cat and "Z" not in cat
    assert cat.get("B2") is b
    with pytest.raises(UnknownItem) as err:
        cat.get("NOPE-42")
    assert "NOPE-42" in str(err.value) and err.value.code == "NOPE-42"
    assert isinstance(err.value, LookupError)
    with pytest.raises(CatalogueError, match="duplicate"):
        Catalogue([a, item(hilist_code="A1")])


# ---------------------------------------------------------------- the file loader

HEADER = ",".join(COLUMNS)
GOOD_ROWS = [
    "XA1,甲药片,drug,A,0,0.415,,片,,test",
    "XB2,乙药注射液,drug,B,0.10,12.50,10.00,支,限定就医方式:住院｜住院患者,test",
    '003,某检查,service,C,0,80.00,,次,"性别限制=女; 频次限制=1次每日",test',
    "C04,导管,material,B,0.30,350.00,,个,,test",
]


def write(tmp_path: Path, rows: list[str], *, comments=("# synthetic: test rows, seed 7",
                                                      "# seed: 7"), header=HEADER) -> Path:
    path = tmp_path / "catalogue.csv"
    path.write_text("\n".join([*comments, header, *rows]) + "\n", encoding="utf-8")
    return path


def test_load_good_file(tmp_path):
    cat = load_catalogue(write(tmp_path, GOOD_ROWS))
    assert len(cat) == 4 and cat.synthetic and cat.meta["seed"] == "7"
    a, b, c, m = list(cat)
    assert (a.chrgitm_lv, a.selfpay_prop, a.pric, a.pric_uplmt_amt) == ("A", 0, Decimal("0.415"),
                                                                        None)
    assert str(a.pric) == "0.415" and a.synthetic and a.source == "test"
    assert b.selfpay_prop == Decimal("0.10") and b.pric_uplmt_amt == Decimal("10.00")
    assert b.inpatient_only and c.sex == "F" and c.kind == "service" and m.unit == "个"
    assert cat.get("XB2") is b


def test_load_without_marker_is_not_synthetic_and_tolerates_bom(tmp_path):
    path = tmp_path / "real.csv"
    path.write_text("\ufeff" + HEADER + "\n" + GOOD_ROWS[0] + "\n", encoding="utf-8")
    cat = load_catalogue(path)
    assert not cat.synthetic and not cat.get("XA1").synthetic


def test_empty_selfpay_prop_means_zero_and_empty_price_means_none(tmp_path):
    cat = load_catalogue(write(tmp_path, ["XA1,甲药,drug,A,,,,片,,"]))
    it = cat.get("XA1")
    assert it.selfpay_prop == 0 and it.pric is None and it.pric_uplmt_amt is None


# (description, replacement for GOOD_ROWS[1] (file line 5: two comments, the header, row 0), field,
#  words in the message)
BAD_ROWS = [
    ("unknown class", "XB2,乙药,drug,D,0.10,12.50,,支,,t", "chrgitm_lv", "unknown class"),
    ("Chinese class", "XB2,乙药,drug,乙,0.10,12.50,,支,,t", "chrgitm_lv", "unknown class"),
    ("empty class", "XB2,乙药,drug,,0.10,12.50,,支,,t", "chrgitm_lv", "unknown class"),
    ("ratio above 1", "XB2,乙药,drug,B,1.5,12.50,,支,,t", "selfpay_prop", "out of 0..1"),
    ("ratio negative", "XB2,乙药,drug,B,-0.1,12.50,,支,,t", "selfpay_prop", "negative"),
    ("ratio not a number", "XB2,乙药,drug,B,ten%,12.50,,支,,t", "selfpay_prop", "not a decimal"),
    ("ratio on class A", "XB2,乙药,drug,A,0.10,12.50,,支,,t", "selfpay_prop", "class A"),
    ("negative price", "XB2,乙药,drug,B,0.10,-12.50,,支,,t", "pric", "negative"),
    ("zero price", "XB2,乙药,drug,B,0.10,0.00,,支,,t", "pric", "greater than zero"),
    ("price not a number", "XB2,乙药,drug,B,0.10,12.5元,,支,,t", "pric", "not a decimal"),
    ("price NaN", "XB2,乙药,drug,B,0.10,NaN,,支,,t", "pric", "not a decimal"),
    ("price exponent", "XB2,乙药,drug,B,0.10,1.25E+1,,支,,t", "pric", "plain decimal"),
    ("price too precise", "XB2,乙药,drug,B,0.10,1.2345678,,支,,t", "pric", "decimals"),
    ("negative ceiling", "XB2,乙药,drug,B,0.10,12.50,-1,支,,t", "pric_uplmt_amt", "negative"),
    ("ceiling garbage", "XB2,乙药,drug,B,0.10,12.50,abc,支,,t", "pric_uplmt_amt", "not a decimal"),
    ("unknown kind", "XB2,乙药,pill,B,0.10,12.50,,支,,t", "kind", "not one of"),
    ("empty code", ",乙药,drug,B,0.10,12.50,,支,,t", "hilist_code", "non-empty"),
    ("code with blank", "XB 2,乙药,drug,B,0.10,12.50,,支,,t", "hilist_code", "blanks"),
    ("empty name", "XB2,,drug,B,0.10,12.50,,支,,t", "name", "empty"),
    ("duplicate code", "XA1,又一个,drug,A,0,1.00,,片,,t", "hilist_code", "first on line 4"),
    ("too few cells", "XB2,乙药,drug,B,0.10", "pric", "cell missing"),
    ("too many cells", "XB2,乙药,drug,B,0.10,12.50,,支,,t,extra", "source", "more cells"),
]


@pytest.mark.parametrize("what,row,field,words", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_load_refuses_bad_rows_naming_row_and_field(tmp_path, what, row, field, words):
    rows = list(GOOD_ROWS)
    rows[1] = row
    path = write(tmp_path, rows)
    with pytest.raises(CatalogueError) as err:
        load_catalogue(path)
    message = str(err.value)
    assert err.value.row == 5, message  # two comment lines, the header, row 0, then this row
    assert err.value.field == field, message
    assert "line 5" in message and f"field {field}" in message, message
    assert words in message, message
    assert str(path) in message
    if field != "hilist_code":
        assert "XB2" in message


def test_duplicate_code_message_names_first_line(tmp_path):
    rows = [*GOOD_ROWS, "XB2,again,drug,A,0,1.00,,片,,t"]
    with pytest.raises(CatalogueError, match=r"line 8 .*duplicate code, first on line 5"):
        load_catalogue(write(tmp_path, rows))


def test_load_refuses_missing_column(tmp_path):
    header = HEADER.replace(",pric_uplmt_amt", "")
    rows = ["XA1,甲药,drug,A,0,0.415,片,,t"]
    with pytest.raises(CatalogueError) as err:
        load_catalogue(write(tmp_path, rows, header=header))
    assert err.value.field == "pric_uplmt_amt" and "line 3" in str(err.value)


def test_load_refuses_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("# synthetic: nothing\n", encoding="utf-8")
    with pytest.raises(CatalogueError, match="no header"):
        load_catalogue(path)


def test_load_refuses_non_utf8_and_nul(tmp_path):
    path = tmp_path / "gbk.csv"
    path.write_bytes((HEADER + "\n").encode() + "XA1,甲药,drug,A,0,1.00,,片,,t\n".encode("gbk"))
    with pytest.raises(CatalogueError, match="line 2: not UTF-8"):
        load_catalogue(path)
    path.write_bytes((HEADER + "\nXA1,\0,drug,A,0,1.00,,片,,t\n").encode())
    with pytest.raises(CatalogueError, match="line 2 .*field name: contains control"):
        load_catalogue(path)


def test_parse_catalogue_accepts_crlf_and_quoted_multiline_restriction():
    text = (HEADER + "\r\n" + 'XA1,甲药,drug,A,0,1.00,,片,"限儿童\r\n第二行",t\r\n'
            + "XA2,乙药,drug,A,0,2.00,,片,,t\r\n")
    cat = parse_catalogue(text)
    assert cat.get("XA1").age_max == 17 and cat.get("XA2").pric == Decimal("2.00")
    with pytest.raises(CatalogueError, match="line 5"):
        parse_catalogue(text + "XA3,丙药,drug,Z,0,1.00,,片,,t\r\n")


@settings(max_examples=60)
@given(price=st.decimals(min_value=Decimal("0.001"), max_value=Decimal("99999.999"), places=3),
       prop=st.sampled_from(["0", "0.05", "0.10", "0.125", "1"]),
       cls=st.sampled_from("ABC"))
def test_item_values_round_trip_through_text(price, prop, cls):
    prop = "0" if cls == "A" else prop
    text = f"{HEADER}\nX9,药,drug,{cls},{prop},{price},,片,,t\n"
    it = parse_catalogue(text).get("X9")
    assert it.pric == price and str(it.pric) == str(price)
    assert it.selfpay_prop == Decimal(prop)
    assert not any(isinstance(getattr(it, f.name), float) for f in dataclasses.fields(it))
