"""Simulated physical card (APDUs) and virtual card (CPM QR) against the host-side checks."""

from __future__ import annotations

import base64
import random
from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from card import cpm
from card.cpm import Tlv, decode_tlv, decode_tlv_one, encode_tlv, parse_cpm_payload
from card.cryptogram import (
    ARC_APPROVED,
    ARC_DECLINED,
    CryptogramResult,
    TransactionData,
    arc_is_approved,
    check_arqc,
    check_atc,
    generate_arpc,
    verify_arqc,
)
from card.identity import is_valid_gb11643, is_valid_luhn
from simulators.cards import (
    PAYMENT_AID,
    SSSE_AID,
    CardError,
    SimulatedCard,
    VirtualCardApp,
    external_authenticate_apdu,
    generate_ac_apdu,
    read_record_apdu,
    select_apdu,
    split_response,
)

ISS_MK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
T0 = 1_750_000_000  # 2025-06-15 23:06:40 CST


@pytest.fixture
def card() -> SimulatedCard:
    return SimulatedCard.synthetic(random.Random(2025), ISS_MK)


def ok(response: bytes) -> bytes:
    data, sw = split_response(response)
    assert sw == 0x9000, f"SW {sw:04X}"
    return data


def sw_of(response: bytes) -> int:
    return split_response(response)[1]


class Host:
    """A minimal issuer host: verifies ARQCs, keeps the highest ATC per card, answers ARPCs."""

    def __init__(self) -> None:
        self.last_atc: dict[str, int] = {}

    def authorise(self, pan: str, psn: str, data: TransactionData, arqc: bytes
                  ) -> tuple[CryptogramResult, bytes, bytes]:
        result = check_arqc(ISS_MK, pan, psn, data, arqc, last_atc=self.last_atc.get(pan))
        if result is CryptogramResult.OK:
            self.last_atc[pan] = data.atc
        arc = ARC_APPROVED if result is CryptogramResult.OK else ARC_DECLINED
        return result, arc, generate_arpc(ISS_MK, pan, psn, arqc, arc)


def test_synthetic_card_holder_data(card: SimulatedCard) -> None:
    assert is_valid_luhn(card.pan) and card.pan.startswith("999933") and len(card.pan) == 19
    assert is_valid_gb11643(card.ssn)
    assert len(card.card_id) == 32 and len(card.card_number) == 9
    assert card.atc == 0
    assert card.atr[0] == 0x3B


def test_apdu_flow_select_read_generate_verify_arpc(card: SimulatedCard) -> None:
    # social-security application: EF05 card identifier and number, EF06 SSN and name
    fci = decode_tlv_one(ok(card.transmit(select_apdu(SSSE_AID))))
    assert fci.tag == 0x6F
    assert fci.find(0x84).value == SSSE_AID
    items = {}
    for record, sfi in [(0x01, 5), (0x07, 5), (0x08, 6), (0x09, 6)]:
        node = decode_tlv_one(ok(card.transmit(read_record_apdu(record, sfi))))
        assert node.tag == record
        items[record] = node.value
    assert items[0x01].decode("ascii") == card.card_id
    assert items[0x07].decode("ascii") == card.card_number
    assert items[0x08].decode("ascii") == card.ssn
    assert items[0x09].decode("gbk") == card.name
    # the exact bytes the PC/SC notes give for selecting SSSE
    assert select_apdu(SSSE_AID)[:20].hex().upper() == \
        "00A404000F7378312E73682EC9E7BBE1B1A3D5CF"

    # payment application: GENERATE AC over the terminal's data
    ok(card.transmit(select_apdu(PAYMENT_AID)))
    requested = TransactionData(amount_authorised_fen=4970, txn_date=date(2025, 6, 15),
                                unpredictable_number=bytes.fromhex("9E8D7C6B"), atc=0,
                                terminal_id="CLINIC01")
    response = decode_tlv_one(ok(card.transmit(generate_ac_apdu(requested))))
    assert response.tag == 0x77
    assert [c.tag for c in response.children] == [0x9F27, 0x9F36, 0x9F26, 0x82]
    cid = response.find(0x9F27).value
    atc = int.from_bytes(response.find(0x9F36).value, "big")
    arqc = response.find(0x9F26).value
    aip = response.find(0x82).value
    assert cid == b"\x80" and atc == 1 == card.atc and len(arqc) == 8

    # terminal forwards CDOL1 + ATC + AIP + ARQC; the host rebuilds the data and verifies
    host = Host()
    data = TransactionData.from_cdol1(requested.cdol1(), atc=atc, aip=aip)
    result, arc, arpc = host.authorise(card.pan, card.psn, data, arqc)
    assert result is CryptogramResult.OK and arc_is_approved(arc)

    # the ARPC goes back to the card; a tampered one would be refused
    assert sw_of(card.transmit(external_authenticate_apdu(arpc, arc))) == 0x9000
    assert card.issuer_authenticated is True and card.last_arc == ARC_APPROVED
    # consumed: a second EXTERNAL AUTHENTICATE has no pending ARQC
    assert sw_of(card.transmit(external_authenticate_apdu(arpc, arc))) == 0x6985

    # the same authorisation request replayed to the host is refused
    result, arc, _ = host.authorise(card.pan, card.psn, data, arqc)
    assert result is CryptogramResult.ATC_REPLAYED and arc == ARC_DECLINED

    # GET DATA ATC
    assert decode_tlv_one(ok(card.transmit(bytes.fromhex("80CA9F3600")))) == \
        Tlv(0x9F36, b"\x00\x01")


def test_tampered_arpc_or_arc_fails_external_authenticate(card: SimulatedCard) -> None:
    ok(card.transmit(select_apdu(PAYMENT_AID)))
    _, arqc = card.generate_ac(100, "T0000001", date(2025, 6, 15), b"\x01\x02\x03\x04")
    arpc = generate_arpc(ISS_MK, card.pan, card.psn, arqc, ARC_APPROVED)
    bad = bytes([arpc[0] ^ 1]) + arpc[1:]
    assert sw_of(card.transmit(external_authenticate_apdu(bad, ARC_APPROVED))) == 0x6300
    assert card.issuer_authenticated is False
    # an approval turned from a decline: ARPC computed for "05", ARC presented as "00"
    _, arqc = card.generate_ac(100, "T0000001", date(2025, 6, 15), b"\x01\x02\x03\x05")
    declined = generate_arpc(ISS_MK, card.pan, card.psn, arqc, ARC_DECLINED)
    assert sw_of(card.transmit(external_authenticate_apdu(declined, ARC_APPROVED))) == 0x6300


def test_python_api_generate_ac_and_process_arpc(card: SimulatedCard) -> None:
    un = bytes.fromhex("DEADBEEF")
    data, arqc = card.generate_ac(2500, "POS00001", date(2025, 6, 15), un)
    assert data.atc == 1 and data.amount_authorised_fen == 2500 and data.terminal_id == "POS00001"
    assert verify_arqc(ISS_MK, card.pan, card.psn, data, arqc)
    arpc = generate_arpc(ISS_MK, card.pan, card.psn, arqc, ARC_DECLINED)
    assert card.process_arpc(arpc, ARC_DECLINED)  # authentic answer, which declines
    assert card.last_arc == ARC_DECLINED
    assert not card.process_arpc(arpc, ARC_DECLINED)  # nothing pending any more
    data2, arqc2 = card.generate_ac(2500, "POS00001", date(2025, 6, 15), un)
    assert data2.atc == 2 and arqc2 != arqc  # same inputs, new ATC, new session key
    assert not card.process_arpc(b"short", ARC_APPROVED)
    with pytest.raises(CardError) as err:
        card.generate_ac(-1, "POS00001", date(2025, 6, 15), un)
    assert err.value.sw == 0x6A80
    assert card.atc == 2  # a refused command does not spend the counter


def test_atc_replay_and_jump_detection(card: SimulatedCard) -> None:
    host = Host()
    first = card.generate_ac(100, "T0000001", date(2025, 6, 15), b"\x00\x00\x00\x01")
    second = card.generate_ac(200, "T0000001", date(2025, 6, 15), b"\x00\x00\x00\x02")
    assert host.authorise(card.pan, card.psn, *second)[0] is CryptogramResult.OK
    # the older cryptogram arriving late is a replay (lower ATC), as is the same one again
    assert host.authorise(card.pan, card.psn, *first)[0] is CryptogramResult.ATC_REPLAYED
    assert host.authorise(card.pan, card.psn, *second)[0] is CryptogramResult.ATC_REPLAYED
    # a forged counter breaks the MAC before the ATC is even looked at
    data, arqc = card.generate_ac(300, "T0000001", date(2025, 6, 15), b"\x00\x00\x00\x03")
    forged = TransactionData.from_cdol1(data.cdol1(), atc=data.atc + 5, aip=data.aip)
    assert host.authorise(card.pan, card.psn, forged, arqc)[0] is CryptogramResult.ARQC_MISMATCH
    # a card whose counter ran far ahead of what the host saw
    card.atc += 5000
    far = card.generate_ac(400, "T0000001", date(2025, 6, 15), b"\x00\x00\x00\x04")
    assert host.authorise(card.pan, card.psn, *far)[0] is CryptogramResult.ATC_JUMP_TOO_LARGE


def test_status_words(card: SimulatedCard) -> None:
    assert sw_of(card.transmit(select_apdu(bytes.fromhex("A000000003101001")))) == 0x6A82
    assert sw_of(card.transmit(read_record_apdu(1, 5))) == 0x6985  # nothing selected
    ok(card.transmit(select_apdu(SSSE_AID)))
    assert sw_of(card.transmit(read_record_apdu(0x02, 5))) == 0x6A83
    assert sw_of(card.transmit(read_record_apdu(0x01, 7))) == 0x6A82
    assert sw_of(card.transmit(bytes.fromhex("00B2012D00"))) == 0x6A86  # P2 low bits not 100
    assert sw_of(card.transmit(bytes.fromhex("00B2002C00"))) == 0x6A86  # record 0
    gen_ac = generate_ac_apdu(TransactionData(
        amount_authorised_fen=1, txn_date=date(2025, 6, 15), unpredictable_number=bytes(4),
        atc=0, terminal_id="T0000001"))
    assert sw_of(card.transmit(gen_ac)) == 0x6985  # SSSE selected, not payment
    ok(card.transmit(select_apdu(PAYMENT_AID)))
    assert sw_of(card.transmit(gen_ac[:-6] + bytes([0x00]))) == 0x6700  # Lc disagrees
    short = bytes.fromhex("80AE800005") + bytes(5)
    assert sw_of(card.transmit(short)) == 0x6700
    bad_bcd = bytearray(gen_ac)
    bad_bcd[5] = 0xAA
    assert sw_of(card.transmit(bytes(bad_bcd))) == 0x6A80
    assert sw_of(card.transmit(bytes([0x80, 0xAE, 0x80, 0x01]) + gen_ac[4:])) == 0x6A86
    assert sw_of(card.transmit(bytes.fromhex("00A4040C0100"))) == 0x6A86
    assert sw_of(card.transmit(bytes.fromhex("00A40400"))) == 0x6700
    assert sw_of(card.transmit(bytes.fromhex("0084000008"))) == 0x6D00  # GET CHALLENGE
    assert sw_of(card.transmit(bytes.fromhex("A0A4000002"))) == 0x6E00
    assert sw_of(card.transmit(bytes.fromhex("00A4"))) == 0x6700
    assert sw_of(card.transmit(bytes.fromhex("00A4040000000F"))) == 0x6700  # extended
    assert sw_of(card.transmit(bytes.fromhex("80CA9F1700"))) == 0x6A82
    assert sw_of(card.transmit(external_authenticate_apdu(bytes(8), ARC_APPROVED))) == 0x6985
    assert sw_of(card.transmit(bytes.fromhex("0082000002AABB"))) == 0x6700
    assert card.atc == 0  # none of that spent the counter


def test_aac_request_and_reset(card: SimulatedCard) -> None:
    ok(card.transmit(select_apdu(PAYMENT_AID)))
    data = TransactionData(amount_authorised_fen=1, txn_date=date(2025, 6, 15),
                           unpredictable_number=bytes(4), atc=0, terminal_id="T0000001")
    response = decode_tlv_one(ok(card.transmit(generate_ac_apdu(data, p1=0x00))))
    assert response.find(0x9F27).value == b"\x00" and card.last_arqc is None
    card.reset()
    assert card.selected is None
    assert sw_of(card.transmit(generate_ac_apdu(data))) == 0x6985
    assert card.atc == 1


def test_atc_exhaustion() -> None:
    card = SimulatedCard(issuer_mk=ISS_MK, pan="9999330000000000018", card_id="X" * 32,
                         card_number="A00000001", ssn="11010519491231002X", name="张伟",
                         atc=0xFFFF)
    with pytest.raises(CardError) as err:
        card.generate_ac(1, "T0000001", date(2025, 6, 15), bytes(4))
    assert err.value.sw == 0x6985


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_transmit_never_raises(apdu: bytes) -> None:
    card = SimulatedCard.synthetic(random.Random(1), ISS_MK)
    for prefix in (b"", select_apdu(PAYMENT_AID)):
        if prefix:
            card.transmit(prefix)
        response = card.transmit(apdu)
        assert len(response) >= 2
        assert split_response(response)[1] in {0x9000, 0x6300, 0x6700, 0x6A80, 0x6A82, 0x6A83,
                                                0x6A86, 0x6985, 0x6D00, 0x6E00}


# -- virtual card (CPM QR) ------------------------------------------------------------------

@pytest.fixture
def app() -> VirtualCardApp:
    return VirtualCardApp(issuer_mk=ISS_MK, pan="9999330000000000018", psn="01",
                          cardholder_name="ZHANG/WEI")


def test_qr_code_pays_once(app: VirtualCardApp) -> None:
    text = app.make_qr(T0, random.Random(1))
    p = parse_cpm_payload(text)
    assert p.pan == app.pan and p.psn == "01" and p.atc == 1 == app.atc and p.cid == 0x80
    assert p.cardholder_name == "ZHANG/WEI"
    assert cpm.decode_cpm_iad(p.iad) == T0
    assert cpm.verify_cpm_cryptogram(ISS_MK, p, T0 + 5) is CryptogramResult.OK
    # the host stores ATC 1; scanning the same code again is a replay
    assert cpm.verify_cpm_cryptogram(ISS_MK, p, T0 + 6, last_atc=1) is CryptogramResult.ATC_REPLAYED


def test_qr_code_expires(app: VirtualCardApp) -> None:
    p = parse_cpm_payload(app.make_qr(T0, random.Random(1)))
    assert cpm.verify_cpm_cryptogram(ISS_MK, p, T0 + 60) is CryptogramResult.OK
    assert cpm.verify_cpm_cryptogram(ISS_MK, p, T0 + 61) is CryptogramResult.CODE_EXPIRED
    assert cpm.verify_cpm_cryptogram(ISS_MK, p, T0 + 3600) is CryptogramResult.CODE_EXPIRED
    assert cpm.verify_cpm_cryptogram(ISS_MK, p, T0 - 120) is CryptogramResult.CODE_NOT_YET_VALID


def _retag(text: str, path: list[int], tag: int, value: bytes) -> str:
    """Replace the value of ``tag`` inside the template reached through ``path``."""
    def rebuild(nodes: tuple[Tlv, ...], rest: list[int]) -> tuple[Tlv, ...]:
        out = []
        for n in nodes:
            if rest and n.tag == rest[0]:
                out.append(Tlv(n.tag, children=rebuild(n.children, rest[1:])))
            elif not rest and n.tag == tag:
                out.append(Tlv(tag, value))
            else:
                out.append(n)
        return tuple(out)
    tree = tuple(decode_tlv(base64.b64decode(text)))
    return base64.b64encode(encode_tlv(rebuild(tree, path))).decode()


@pytest.mark.parametrize("path, tag, value", [
    ([0x62, 0x64], 0x9F36, b"\x00\x09"),                       # raise the ATC
    ([0x62, 0x64], 0x9F37, b"\x00\x00\x00\x00"),               # other UN
    ([0x62, 0x64], 0x9F10, bytes.fromhex("0501") + (T0 + 300).to_bytes(4, "big")),  # later issue
    ([0x62, 0x64], 0x82, b"\x00\x00"),                         # AIP
    ([0x62, 0x64], 0x9F10, bytes.fromhex("0501FFFFFFFF")),    # issue time in 2106
    ([0x61], 0x5A, bytes.fromhex("9999330000000000026F")),     # another card's PAN
    ([0x61], 0x5F34, b"\x02"),                                 # another PSN
])
def test_tampered_qr_code_is_refused(app: VirtualCardApp, path: list[int], tag: int,
                                     value: bytes) -> None:
    text = app.make_qr(T0, random.Random(1))
    tampered = _retag(text, path, tag, value)
    assert tampered != text
    p = parse_cpm_payload(tampered)
    assert cpm.verify_cpm_cryptogram(ISS_MK, p, T0 + 1) is CryptogramResult.ARQC_MISMATCH


def test_tampered_cryptogram_bits(app: VirtualCardApp) -> None:
    p = parse_cpm_payload(app.make_qr(T0, random.Random(1)))
    for i in range(8):
        cryptogram = bytearray(p.cryptogram)
        cryptogram[i] ^= 0x01
        text = _retag(app.make_qr(T0, random.Random(1)), [0x62, 0x64], 0x9F26, bytes(cryptogram))
        q = parse_cpm_payload(text)
        assert cpm.verify_cpm_cryptogram(ISS_MK, q, T0 + 1) is CryptogramResult.ARQC_MISMATCH


def test_display_data_is_not_covered(app: VirtualCardApp) -> None:
    text = app.make_qr(T0, random.Random(1))
    renamed = _retag(text, [0x61], 0x5F20, b"LI/NA")
    assert cpm.verify_cpm_cryptogram(ISS_MK, parse_cpm_payload(renamed), T0) is CryptogramResult.OK


def test_each_code_is_fresh_and_a_newer_code_supersedes(app: VirtualCardApp) -> None:
    rng = random.Random(9)
    first, second = app.make_qr(T0, rng), app.make_qr(T0 + 10, rng)
    p1, p2 = parse_cpm_payload(first), parse_cpm_payload(second)
    assert (p1.atc, p2.atc) == (1, 2)
    assert p1.unpredictable_number != p2.unpredictable_number
    assert p1.cryptogram != p2.cryptogram
    last_atc = None
    assert cpm.verify_cpm_cryptogram(ISS_MK, p2, T0 + 15, last_atc=last_atc) is CryptogramResult.OK
    last_atc = p2.atc
    assert cpm.verify_cpm_cryptogram(ISS_MK, p1, T0 + 16, last_atc=last_atc) \
        is CryptogramResult.ATC_REPLAYED
    assert check_atc(last_atc, p1.atc) is CryptogramResult.ATC_REPLAYED


def test_wrong_issuer_key_and_deterministic_rng(app: VirtualCardApp) -> None:
    text = app.make_qr(T0, random.Random(5))
    assert cpm.verify_cpm_cryptogram(bytes(16), parse_cpm_payload(text), T0) \
        is CryptogramResult.ARQC_MISMATCH
    again = VirtualCardApp(issuer_mk=ISS_MK, pan=app.pan, psn="01", cardholder_name="ZHANG/WEI")
    assert again.make_qr(T0, random.Random(5)) == text


def test_virtual_card_atc_exhaustion() -> None:
    app = VirtualCardApp(issuer_mk=ISS_MK, pan="9999330000000000018", atc=0xFFFF)
    with pytest.raises(ValueError):
        app.make_qr(T0, random.Random(1))
