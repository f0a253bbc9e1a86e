"""BER-TLV codec, EMVCo CPM payloads and QR rendering (card.cpm, card.qr)."""

from __future__ import annotations

import base64
import io
import random
from dataclasses import replace

import pytest
import zxingcpp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from card import cpm
from card.cpm import (
    CpmError,
    Tlv,
    TLVError,
    build_cpm_payload,
    decode_tlv,
    decode_tlv_one,
    encode_tlv,
    parse_cpm_payload,
)
from card.cryptogram import CryptogramResult, derive_icc_mk
from card.qr import qr_matrix, render_qr_png, render_qr_terminal

PUBLISHED = ("hQVDUFYwMWETTwegAAAAVVVVUAhQcm9kdWN0MWETTwegAAAAZmZmUAhQcm9kdWN0MmJJWggSNFZ4kBI0WF8g"
             "DkNBUkRIT0xERVIvRU1WXy0IcnVlc2RlZW5kIZ8QBwYBCgMAAACfJghYT9OF+iNLzJ82AgABnzcEbVjvEw==")
ISS_MK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
PAN = "9999330000000000018"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# -- the published example ---------------------------------------------------------------------

def test_published_payload_decodes() -> None:
    p = parse_cpm_payload(PUBLISHED)
    assert p.format_indicator == "CPV01"
    assert [a.label for a in p.applications] == ["Product1", "Product2"]
    assert [a.aid.hex().upper() for a in p.applications] == ["A0000000555555", "A0000000666666"]
    assert p.cryptogram.hex().upper() == "584FD385FA234BCC"
    assert p.atc == 0x0001
    assert p.unpredictable_number.hex().upper() == "6D58EF13"
    assert p.pan == "1234567890123458"
    assert p.cardholder_name == "CARDHOLDER/EMV"
    assert p.language_preference == "ruesdeen"
    assert p.iad.hex().upper() == "06010A03000000"
    assert p.cid is None and p.aip is None and p.psn is None


def test_published_payload_tree_is_preserved_and_reencodes_exactly() -> None:
    raw = base64.b64decode(PUBLISHED)
    tree = decode_tlv(raw)
    assert [n.tag for n in tree] == [0x85, 0x61, 0x61, 0x62]  # repeated 61 kept, in order
    assert encode_tlv(tree) == raw
    assert parse_cpm_payload(PUBLISHED).tree == tuple(tree)
    transparent = tree[3].find(0x64)
    assert transparent is not None
    assert [c.tag_hex for c in transparent.children] == ["9F10", "9F26", "9F36", "9F37"]


def test_published_payload_is_not_ours_to_verify() -> None:
    with pytest.raises(CpmError, match="IAD"):
        cpm.verify_cpm_cryptogram(ISS_MK, parse_cpm_payload(PUBLISHED), 0)


# -- TLV unit cases ----------------------------------------------------------------------------

def test_length_forms() -> None:
    assert Tlv(0x5A, b"\x01" * 127).encode()[:2] == bytes.fromhex("5A7F")
    assert Tlv(0x5A, b"\x01" * 128).encode()[:3] == bytes.fromhex("5A8180")
    assert Tlv(0x5A, b"\x01" * 255).encode()[:3] == bytes.fromhex("5A81FF")
    assert Tlv(0x5A, b"\x01" * 256).encode()[:4] == bytes.fromhex("5A820100")
    with pytest.raises(TLVError):
        Tlv(0x5A, b"\x01" * 65536).encode()


def test_multibyte_and_constructed_tags() -> None:
    node = Tlv(0xBF0C, children=(Tlv(0x9F4D, b"\x0b\x0a"), Tlv(0xDF8101, b"x")))
    raw = node.encode()
    assert raw.hex().upper() == "BF0C0A" "9F4D020B0A" "DF810101" "78"
    assert decode_tlv_one(raw) == node
    assert node.constructed and not node.children[0].constructed


def test_non_minimal_long_length_is_tolerated() -> None:
    assert decode_tlv(bytes.fromhex("5A810201 02")) == [Tlv(0x5A, b"\x01\x02")]
    assert decode_tlv(bytes.fromhex("5A82000101")) == [Tlv(0x5A, b"\x01")]


def test_empty_input_and_empty_constructed() -> None:
    assert decode_tlv(b"") == []
    assert decode_tlv(bytes.fromhex("6100")) == [Tlv(0x61)]


@pytest.mark.parametrize("hexdata, reason", [
    ("5A", "truncated before the length"),
    ("5A05 0102", "truncated"),
    ("9F", "truncated multi-byte tag"),
    ("9F81", "truncated multi-byte tag"),
    ("9F818101 00", "longer than"),
    ("5A8101", "truncated"),
    ("5A81", "truncated long-form"),
    ("5A82 01", "truncated long-form"),
    ("5A80 0000", "indefinite"),
    ("5A83 000001 00", "length form 83"),
    ("5A84 00000001 00", "length form 84"),
    ("00 02 0102", "tag byte 00"),
    ("6103 5A0501", "truncated"),  # constructed content is not exact TLV
])
def test_decoder_errors(hexdata: str, reason: str) -> None:
    with pytest.raises(TLVError, match=reason):
        decode_tlv(bytes.fromhex(hexdata.replace(" ", "")))


def test_length_and_depth_limits() -> None:
    with pytest.raises(TLVError, match="exceeds 4"):
        decode_tlv(bytes.fromhex("5A05") + bytes(5), length_max=4)
    deep = Tlv(0x5A, b"x")
    for _ in range(cpm.TLV_DEPTH_MAX):
        deep = Tlv(0x61, children=(deep,))
    decode_tlv(deep.encode())
    with pytest.raises(TLVError, match="nesting"):
        decode_tlv(Tlv(0x61, children=(deep,)).encode())
    with pytest.raises(TLVError, match="nesting"):
        decode_tlv(bytes.fromhex("6102" "6100"), depth_max=0)


def test_decode_one_refuses_trailing_bytes_and_nothing() -> None:
    with pytest.raises(TLVError, match="trailing"):
        decode_tlv_one(bytes.fromhex("5A0101" "5A0102"))
    with pytest.raises(TLVError, match="no data object"):
        decode_tlv_one(b"")
    with pytest.raises(TLVError):
        decode_tlv("5A0101")  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [
    {"tag": 0}, {"tag": 0x9F}, {"tag": 0x1F01 << 8}, {"tag": 0x5A5A}, {"tag": 0x9F8181},
    {"tag": 0x9F818181}, {"tag": 0x61, "value": b"x"},
    {"tag": 0x5A, "children": (Tlv(0x5A, b""),)}, {"tag": 0x5A, "value": "text"},
    {"tag": 0x61, "children": ("x",)},
])
def test_tlv_node_validation(kwargs: dict) -> None:
    with pytest.raises(TLVError):
        Tlv(**kwargs)


# -- hypothesis: TLV round trip over random trees ----------------------------------------------

def _tag(constructed: bool) -> st.SearchStrategy[int]:
    cbit = 0x20 if constructed else 0x00

    def one_byte(low: int, cls: int) -> int:
        return cls | cbit | low

    single = st.builds(one_byte, st.integers(1 if not constructed else 0, 0x1E),
                       st.sampled_from([0x00, 0x40, 0x80, 0xC0]))
    two = st.builds(lambda cls, b: ((cls | cbit | 0x1F) << 8) | b,
                    st.sampled_from([0x00, 0x40, 0x80, 0xC0]), st.integers(0x00, 0x7F))
    three = st.builds(lambda cls, b1, b2: ((cls | cbit | 0x1F) << 16) | (b1 << 8) | b2,
                      st.sampled_from([0x00, 0x40, 0x80, 0xC0]), st.integers(0x80, 0xFF),
                      st.integers(0x00, 0x7F))
    return st.one_of(single, two, three).filter(lambda t: t.to_bytes(
        (t.bit_length() + 7) // 8, "big")[0] != 0)


PRIMITIVE = st.builds(lambda tag, value: Tlv(tag, value), _tag(False),
                      st.one_of(st.binary(max_size=40), st.binary(min_size=120, max_size=300)))
TREES = st.recursive(
    PRIMITIVE,
    lambda kids: st.builds(lambda tag, children: Tlv(tag, children=tuple(children)),
                           _tag(True), st.lists(kids, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TREES, max_size=5))
def test_tlv_round_trip(nodes: list[Tlv]) -> None:
    raw = encode_tlv(nodes)
    assert decode_tlv(raw) == nodes
    assert encode_tlv(decode_tlv(raw)) == raw


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decoder_on_random_bytes_raises_only_tlverror(raw: bytes) -> None:
    try:
        nodes = decode_tlv(raw)
    except TLVError:
        return
    assert encode_tlv(nodes) == raw or len(encode_tlv(nodes)) < len(raw)  # non-minimal lengths


# -- CPM build / parse --------------------------------------------------------------------------

def ours(**overrides) -> str:
    kwargs = dict(pan=PAN, cryptogram=bytes.fromhex("0102030405060708"), atc=42,
                  unpredictable_number=bytes.fromhex("CAFEBABE"), iad=cpm.cpm_iad(1_750_000_000),
                  cardholder_name="ZHANG/WEI", psn="01")
    kwargs.update(overrides)
    return build_cpm_payload(**kwargs)


def test_build_parse_round_trip() -> None:
    text = ours()
    p = parse_cpm_payload(text)
    assert p.pan == PAN and p.psn == "01" and p.cardholder_name == "ZHANG/WEI"
    assert p.cryptogram == bytes.fromhex("0102030405060708") and p.atc == 42
    assert p.unpredictable_number == bytes.fromhex("CAFEBABE")
    assert cpm.decode_cpm_iad(p.iad) == 1_750_000_000
    assert p.cid == 0x80 and p.aip == bytes.fromhex("1C00")
    [app] = p.applications
    assert app.aid == cpm.PAYMENT_AID and app.label == "CITIZEN CARD" and app.pan == PAN
    tree = decode_tlv(base64.b64decode(text))
    assert [n.tag for n in tree] == [0x85, 0x61, 0x62]
    assert [c.tag for c in tree[2].children] == [0x64]
    assert parse_cpm_payload("  " + text + "\n") == p


def test_pan_bcd_padding() -> None:
    assert cpm.encode_pan_bcd("1234567890123") == bytes.fromhex("1234567890123F")
    assert cpm.decode_pan_bcd(bytes.fromhex("1234567890123F")) == "1234567890123"
    for bad in ["12345678901234FF", "12345678901A3456", "1234"]:
        with pytest.raises(CpmError):
            cpm.decode_pan_bcd(bytes.fromhex(bad))


def test_optional_elements_can_be_left_out() -> None:
    p = parse_cpm_payload(ours(iad=None, cardholder_name=None, psn=None, cid=None, aip=None,
                               label=None))
    assert p.iad is None and p.cardholder_name is None and p.psn is None
    assert p.cid is None and p.aip is None and p.applications[0].label is None


def _tree(*nodes: Tlv) -> str:
    return b64(encode_tlv(list(nodes)))


CRYPTO = (Tlv(0x9F26, bytes(8)), Tlv(0x9F36, b"\x00\x01"), Tlv(0x9F37, bytes(4)))
APP = Tlv(0x61, children=(Tlv(0x4F, cpm.PAYMENT_AID), Tlv(0x5A, cpm.encode_pan_bcd(PAN))))
PFI = Tlv(0x85, b"CPV01")


def test_cryptogram_may_sit_in_an_application_specific_template() -> None:
    app = Tlv(0x61, children=APP.children + (Tlv(0x63, children=CRYPTO),))
    assert parse_cpm_payload(_tree(PFI, app)).atc == 1


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("   ", "empty"),
    ("not base64!", "base64"),
    ("hQVDUFYwMQ", "base64"),              # missing padding
    ("hQVDUFYwMQ==\u00e9", "base64"),       # non-ASCII
    ("A" * (cpm.CPM_TEXT_MAX + 4), "longer than"),
    (b64(b"\x85\x05CPV"), "BER-TLV"),
    (b64(bytes.fromhex("5A0101")), "missing payload format indicator"),
    (_tree(APP, PFI), "must come first"),
    (_tree(Tlv(0x85, b"CPV02"), APP), "expected b'CPV01'"),
    (_tree(PFI, PFI, APP), "85 appears 2 times"),
    (_tree(PFI), "no application template"),
    (_tree(PFI, APP, Tlv(0x5A, b"\x01")), "unexpected tag 5A"),
    (_tree(PFI, APP, Tlv(0x62, children=(Tlv(0x64, children=CRYPTO[1:]),))),
     "missing application cryptogram"),
    (_tree(PFI, APP, Tlv(0x62, children=(Tlv(0x64, children=(Tlv(0x9F26, bytes(7)),)
                                                + CRYPTO[1:]),))), "must be 8 bytes"),
    (_tree(PFI, APP, Tlv(0x62, children=(Tlv(0x64, children=CRYPTO[:2]),))),
     "missing unpredictable number"),
    (_tree(PFI, APP, Tlv(0x62, children=(Tlv(0x64, children=CRYPTO + CRYPTO[:1]),))),
     "9F26 appears 2 times"),
    (_tree(PFI, APP), "missing application cryptogram"),
    (_tree(PFI, Tlv(0x61, children=(Tlv(0x4F, cpm.PAYMENT_AID),)),
           Tlv(0x62, children=(Tlv(0x64, children=CRYPTO),))), "missing PAN"),
    (_tree(PFI, Tlv(0x61, children=(Tlv(0x50, b"x"),))), "without an AID"),
    (_tree(PFI, Tlv(0x61, children=(Tlv(0x4F, b"\xA0"),))), "AID"),
    (_tree(PFI, Tlv(0x61, children=APP.children + (Tlv(0x50, b"\xff"),))), "not ASCII"),
    (_tree(PFI, APP, Tlv(0x62, children=(Tlv(0x64, children=CRYPTO + (Tlv(0x9F27, b""),)),))),
     "CID"),
])
def test_parse_errors(text: str, reason: str) -> None:
    with pytest.raises(CpmError, match=reason):
        parse_cpm_payload(text)


def test_parse_rejects_non_text() -> None:
    with pytest.raises(CpmError):
        parse_cpm_payload(base64.b64decode(PUBLISHED))  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [
    {"cryptogram": bytes(7)}, {"atc": 65536}, {"atc": -1}, {"unpredictable_number": bytes(5)},
    {"pan": "1234"}, {"pan": "12345678901234567890"}, {"cardholder_name": "张伟"},
    {"label": "L" * 17}, {"psn": "1"}, {"aid": b"\xA0"}, {"iad": bytes(33)}, {"cid": 256},
    {"aip": b"\x00"},
])
def test_build_rejects_malformed(kwargs: dict) -> None:
    with pytest.raises(CpmError):
        ours(**kwargs)


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_random_text_raises_only_cpm_error(text: str) -> None:
    try:
        parse_cpm_payload(text)
    except CpmError:
        pass


@settings(max_examples=300)
@given(st.data())
def test_mutated_payloads_raise_only_cpm_error(data: st.DataObject) -> None:
    raw = bytearray(base64.b64decode(data.draw(st.sampled_from([PUBLISHED, ours()]))))
    op = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    if op == "flip":
        raw[pos] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        del raw[pos:]
    else:
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    try:
        parse_cpm_payload(b64(bytes(raw)))
    except CpmError:
        pass


# -- CPM cryptogram (pure functions; the virtual card's flow is in test_card_simulator) --------

def test_cpm_cryptogram_round_trip_and_window() -> None:
    icc_mk = derive_icc_mk(ISS_MK, PAN, "01")
    t0 = 1_750_000_000
    un = bytes.fromhex("01020304")
    cryptogram, iad = cpm.make_cpm_cryptogram(icc_mk, issued_at_s=t0, atc=3, unpredictable_number=un)
    assert iad == bytes.fromhex("0501") + t0.to_bytes(4, "big")
    p = parse_cpm_payload(ours(cryptogram=cryptogram, atc=3, unpredictable_number=un, iad=iad))
    verify = cpm.verify_cpm_cryptogram
    assert verify(ISS_MK, p, t0) is CryptogramResult.OK
    assert verify(ISS_MK, p, t0 + 60) is CryptogramResult.OK
    assert verify(ISS_MK, p, t0 + 61) is CryptogramResult.CODE_EXPIRED
    assert verify(ISS_MK, p, t0 + 61, validity_s=120) is CryptogramResult.OK
    assert verify(ISS_MK, p, t0 - 30) is CryptogramResult.OK
    assert verify(ISS_MK, p, t0 - 31) is CryptogramResult.CODE_NOT_YET_VALID
    assert verify(ISS_MK, p, t0, last_atc=2) is CryptogramResult.OK
    assert verify(ISS_MK, p, t0, last_atc=3) is CryptogramResult.ATC_REPLAYED
    assert verify(ISS_MK, replace(p, psn="02"), t0) is CryptogramResult.ARQC_MISMATCH
    assert verify(ISS_MK, replace(p, aip=bytes(2)), t0) is CryptogramResult.ARQC_MISMATCH
    assert verify(bytes(16), p, t0) is CryptogramResult.ARQC_MISMATCH


def test_iad_helpers_validate() -> None:
    for bad in [None, b"", bytes.fromhex("0601") + bytes(4), bytes.fromhex("0501") + bytes(5)]:
        with pytest.raises(CpmError):
            cpm.decode_cpm_iad(bad)
    for bad in [-1, 2**32, True]:
        with pytest.raises(CpmError):
            cpm.cpm_iad(bad)


# -- QR rendering ----------------------------------------------------------------------------

def _decode_image(image: Image.Image) -> list[str]:
    return [r.text for r in zxingcpp.read_barcodes(image)]


@pytest.mark.parametrize("text", [PUBLISHED, "hello", "x" * 400])
def test_png_decodes_to_the_exact_text(text: str) -> None:
    png = render_qr_png(text)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    assert _decode_image(image) == [text]


def test_virtual_card_code_png_round_trip() -> None:
    from simulators.cards import VirtualCardApp

    app = VirtualCardApp(issuer_mk=ISS_MK, pan=PAN, cardholder_name="LI/NA")
    text = app.make_qr(1_750_000_000, random.Random(3))
    assert _decode_image(Image.open(io.BytesIO(render_qr_png(text)))) == [text]


def _terminal_to_image(rendered: str, invert: bool = True, scale: int = 6) -> Image.Image:
    rows: list[list[bool]] = []
    for line in rendered.split("\n"):
        top = [ch in "█▀" for ch in line]
        bottom = [ch in "█▄" for ch in line]
        rows += [top, bottom]
    dark = [[(not ink) if invert else ink for ink in row] for row in rows]
    image = Image.new("L", (len(dark[0]), len(dark)), 255)
    image.putdata([0 if d else 255 for row in dark for d in row])
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


@pytest.mark.parametrize("invert", [True, False])
def test_terminal_rendering_is_a_readable_code(invert: bool) -> None:
    text = ours()
    rendered = render_qr_terminal(text, invert=invert)
    matrix = qr_matrix(text)
    lines = rendered.split("\n")
    assert len(lines) == (len(matrix) + 1) // 2
    assert all(len(line) == len(matrix[0]) for line in lines)
    assert set(rendered) <= set("█▀▄ \n")
    assert _decode_image(_terminal_to_image(rendered, invert)) == [text]


def test_qr_rejects_empty_text() -> None:
    with pytest.raises(ValueError):
        render_qr_png("")
    with pytest.raises(ValueError):
        render_qr_terminal("")
    with pytest.raises(ValueError):
        render_qr_png("x", box_size=0)
