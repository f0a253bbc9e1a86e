"""EMV Book 2 key derivation, ARQC/ARPC and ATC checks (card.cryptogram)."""

from __future__ import annotations

import warnings
from dataclasses import replace
from datetime import date

import pytest
from cryptography.utils import CryptographyDeprecationWarning
from hypothesis import given, settings
from hypothesis import strategies as st

from card import cryptogram as cg
from card.cryptogram import (
    ARC_APPROVED,
    ARC_CARD_AUTH_FAILED,
    ARC_DECLINED,
    ARC_INSUFFICIENT_FUNDS,
    ATC_JUMP_MAX,
    CryptogramError,
    CryptogramResult,
    TransactionData,
)

# The published, HSM-checked vector (pyemv's tests/test_ac.py, "ARPC generation using ICC
# Master Key", EMV padding): opaque 16-byte AC data and ARC 0000.
ISS_MK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
VEC_PAN, VEC_PSN = "9901234567890123", "45"
VEC_R = bytes.fromhex("1234567890123456")
VEC_DATA = bytes.fromhex("0123456789ABCDEF0123456789ABCDEF")
VEC_ARC = bytes.fromhex("0000")

PAN = "9999330000000000018"
PSN = "01"


def sample(**changes) -> TransactionData:
    base = TransactionData(amount_authorised_fen=12345, txn_date=date(2025, 3, 14),
                           unpredictable_number=bytes.fromhex("A1B2C3D4"), atc=7,
                           terminal_id="T0000042")
    return replace(base, **changes)


# -- the conformance vector -------------------------------------------------------------------

def test_hsm_vector_all_four_values() -> None:
    assert cg.key_check_value(ISS_MK) == "08D7"
    icc_mk = cg.derive_icc_mk(ISS_MK, VEC_PAN, VEC_PSN)
    assert cg.key_check_value(icc_mk) == "1DA5"
    sk = cg.derive_session_key_from_r(icc_mk, VEC_R)
    assert cg.key_check_value(sk) == "0995"
    arqc = cg.compute_ac(sk, VEC_DATA)
    assert arqc.hex().upper() == "4B46013359B7A58B"
    # ARPC method 1, keyed with the ICC master key: low level and through the host API
    assert cg.compute_arpc(icc_mk, arqc, VEC_ARC).hex().upper() == "F8C9CECAABD55AD1"
    assert cg.generate_arpc(ISS_MK, VEC_PAN, VEC_PSN, arqc, VEC_ARC).hex().upper() == \
        "F8C9CECAABD55AD1"
    assert cg.verify_arpc(icc_mk, arqc, VEC_ARC, bytes.fromhex("F8C9CECAABD55AD1"))


def test_psn_as_int_is_the_same_key() -> None:
    assert cg.derive_icc_mk(ISS_MK, VEC_PAN, 45) == cg.derive_icc_mk(ISS_MK, VEC_PAN, "45")


def test_common_session_key_with_atc_diversifier() -> None:
    # pyemv's documented example: MK 0123..3210, R = 001C000000000000
    assert cg.session_key_r(0x1C) == bytes.fromhex("001C000000000000")
    assert cg.derive_session_key(ISS_MK, 0x1C).hex().upper() == "E9FB384AF807B940FEDCEA613461B0C4"


def test_annex_d_order_matches_pyemv_example() -> None:
    # pyemv's generate_ac example lists the Book 2 recommended minimum set in this order.
    data = TransactionData(amount_authorised_fen=2000, txn_date=date(2011, 3, 9),
                           unpredictable_number=bytes.fromhex("3804823E"), atc=1,
                           terminal_id="ABCD1234", country_code="0124", currency_code="0124",
                           tvr=bytes.fromhex("0000008000"), aip=bytes.fromhex("5800"))
    raw = data.to_bytes()
    expected_min = bytes.fromhex("000000002000" "000000000000" "0124" "0000008000" "0124"
                                 "110309" "00" "3804823E" "5800" "0001")
    assert raw == expected_min + b"ABCD1234"
    sk = bytes.fromhex("AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBB")
    assert cg.compute_ac(sk, raw[:33]).hex().upper() == "3B76CF10FECD8789"


def test_iad_is_appended_last() -> None:
    assert sample(iad=b"\x05\x01abcd").to_bytes() == sample().to_bytes() + b"\x05\x01abcd"


def test_cdol1_round_trip() -> None:
    data = sample()
    raw = data.cdol1()
    assert len(raw) == cg.CDOL1_LENGTH == 23
    assert raw.hex().upper() == "000000012345" "0156" "250314" "A1B2C3D4" + b"T0000042".hex().upper()
    assert TransactionData.from_cdol1(raw, atc=7) == data


@pytest.mark.parametrize("raw", [b"", bytes(22), bytes.fromhex("00000001234A") + bytes(17),
                                 bytes(6) + b"\x01\x56" + bytes.fromhex("251332") + bytes(12),
                                 bytes(6) + b"\x01\x56" + bytes.fromhex("250314") + bytes(4)
                                 + b"\xff" * 8])
def test_from_cdol1_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(CryptogramError):
        TransactionData.from_cdol1(raw, atc=1)


# -- round trips ------------------------------------------------------------------------------

def test_card_and_host_agree() -> None:
    icc_mk = cg.derive_icc_mk(ISS_MK, PAN, PSN)
    data = sample()
    arqc = cg.generate_arqc(icc_mk, data)
    assert len(arqc) == 8
    assert cg.verify_arqc(ISS_MK, PAN, PSN, data, arqc)
    assert cg.check_arqc(ISS_MK, PAN, PSN, data, arqc, last_atc=6) is CryptogramResult.OK
    arpc = cg.generate_arpc(ISS_MK, PAN, PSN, arqc, ARC_APPROVED)
    assert cg.verify_arpc(icc_mk, arqc, ARC_APPROVED, arpc)
    # the ARC is authenticated: flipping approval to decline (or back) breaks the ARPC
    assert not cg.verify_arpc(icc_mk, arqc, ARC_DECLINED, arpc)
    assert cg.generate_arpc(ISS_MK, PAN, PSN, arqc, ARC_DECLINED) != arpc


@pytest.mark.parametrize("change", [
    {"amount_authorised_fen": 12346}, {"terminal_id": "T0000043"}, {"atc": 8},
    {"unpredictable_number": bytes.fromhex("A1B2C3D5")}, {"txn_date": date(2025, 3, 15)},
    {"currency_code": "0840"}, {"tvr": bytes.fromhex("0000000001")}, {"txn_type": "01"},
    {"aip": bytes.fromhex("1800")}, {"amount_other_fen": 1}, {"country_code": "0344"},
    {"iad": b"\x01"},
])
def test_any_changed_field_fails_verification(change: dict) -> None:
    arqc = cg.generate_arqc(cg.derive_icc_mk(ISS_MK, PAN, PSN), sample())
    assert not cg.verify_arqc(ISS_MK, PAN, PSN, sample(**change), arqc)
    assert cg.check_arqc(ISS_MK, PAN, PSN, sample(**change), arqc, last_atc=None) \
        is CryptogramResult.ARQC_MISMATCH


def test_wrong_card_or_key_fails() -> None:
    arqc = cg.generate_arqc(cg.derive_icc_mk(ISS_MK, PAN, PSN), sample())
    assert not cg.verify_arqc(ISS_MK, PAN, "02", sample(), arqc)
    assert not cg.verify_arqc(ISS_MK, "9999330000000000026", PSN, sample(), arqc)
    assert not cg.verify_arqc(bytes(16), PAN, PSN, sample(), arqc)
    assert not cg.verify_arqc(ISS_MK, PAN, PSN, sample(), arqc[:7])
    assert not cg.verify_arqc(ISS_MK, PAN, PSN, sample(), arqc + b"\x00")
    assert not cg.verify_arqc(ISS_MK, PAN, PSN, sample(), "not bytes")  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(amount=st.integers(0, cg.AMOUNT_N12_MAX), atc=st.integers(0, 0xFFFF),
       un=st.binary(min_size=4, max_size=4), day=st.dates(date(2000, 1, 1), date(2049, 12, 31)),
       bit=st.integers(0, 63))
def test_round_trip_and_single_bit_flip(amount: int, atc: int, un: bytes, day: date,
                                        bit: int) -> None:
    data = TransactionData(amount_authorised_fen=amount, txn_date=day, unpredictable_number=un,
                           atc=atc, terminal_id="POS 0001")
    arqc = cg.generate_arqc(cg.derive_icc_mk(ISS_MK, PAN, PSN), data)
    assert cg.verify_arqc(ISS_MK, PAN, PSN, data, arqc)
    flipped = (int.from_bytes(arqc, "big") ^ (1 << bit)).to_bytes(8, "big")
    assert not cg.verify_arqc(ISS_MK, PAN, PSN, data, flipped)


# -- ATC ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("last, atc, expected", [
    (None, 0, CryptogramResult.OK),
    (None, 65535, CryptogramResult.OK),
    (5, 6, CryptogramResult.OK),
    (5, 5, CryptogramResult.ATC_REPLAYED),
    (5, 4, CryptogramResult.ATC_REPLAYED),
    (5, 5 + ATC_JUMP_MAX, CryptogramResult.OK),
    (5, 6 + ATC_JUMP_MAX, CryptogramResult.ATC_JUMP_TOO_LARGE),
    (65534, 65535, CryptogramResult.OK),
])
def test_check_atc(last: int | None, atc: int, expected: CryptogramResult) -> None:
    assert cg.check_atc(last, atc) is expected


def test_check_atc_custom_bound_and_range() -> None:
    assert cg.check_atc(1, 3, jump_max=1) is CryptogramResult.ATC_JUMP_TOO_LARGE
    for bad in [(None, -1), (None, 65536), (65536, 1), (None, True)]:
        with pytest.raises(CryptogramError):
            cg.check_atc(*bad)


def test_check_arqc_replay_after_valid_mac() -> None:
    data = sample(atc=9)
    arqc = cg.generate_arqc(cg.derive_icc_mk(ISS_MK, PAN, PSN), data)
    assert cg.check_arqc(ISS_MK, PAN, PSN, data, arqc, last_atc=9) is CryptogramResult.ATC_REPLAYED


def test_result_codes_are_stable() -> None:
    assert [r.value for r in CryptogramResult] == [
        "ok", "arqc_mismatch", "atc_replayed", "atc_jump_too_large", "code_expired",
        "code_not_yet_valid"]
    assert CryptogramResult("atc_replayed") is CryptogramResult.ATC_REPLAYED


def test_arc_codes() -> None:
    assert ARC_APPROVED.hex() == "3030" and ARC_DECLINED.hex() == "3035"
    assert ARC_INSUFFICIENT_FUNDS.hex() == "3531" and ARC_CARD_AUTH_FAILED.hex() == "5131"
    assert cg.arc_is_approved(ARC_APPROVED)
    assert not any(map(cg.arc_is_approved, [ARC_DECLINED, ARC_INSUFFICIENT_FUNDS,
                                             ARC_CARD_AUTH_FAILED, b"\x00\x00"]))


# -- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"amount_authorised_fen": -1}, {"amount_authorised_fen": 1.5}, {"amount_authorised_fen": True},
    {"amount_authorised_fen": 10**12}, {"amount_other_fen": -5}, {"currency_code": "156"},
    {"currency_code": "CNY0"}, {"country_code": 156}, {"tvr": bytes(4)},
    {"unpredictable_number": bytes(3)}, {"aip": bytes(3)}, {"atc": 65536}, {"atc": -1},
    {"terminal_id": "T000004"}, {"terminal_id": "T00000\u00e942"}, {"txn_type": "0"},
    {"txn_date": date(1999, 12, 31)}, {"txn_date": "2025-03-14"}, {"iad": bytes(33)},
])
def test_transaction_data_validation(change: dict) -> None:
    with pytest.raises(CryptogramError):
        sample(**change)


def test_key_and_input_validation() -> None:
    with pytest.raises(CryptogramError):
        cg.derive_icc_mk(bytes(8), PAN, PSN)
    with pytest.raises(CryptogramError):
        cg.derive_icc_mk(ISS_MK, "12345", PSN)
    with pytest.raises(CryptogramError):
        cg.derive_icc_mk(ISS_MK, PAN, "1")
    with pytest.raises(CryptogramError):
        cg.derive_session_key_from_r(ISS_MK, bytes(7))
    with pytest.raises(CryptogramError):
        cg.compute_arpc(ISS_MK, bytes(8), b"000")
    with pytest.raises(CryptogramError):
        cg.generate_arqc(ISS_MK, b"raw bytes")  # type: ignore[arg-type]
    assert isinstance(CryptogramError("x"), ValueError)


# -- warnings -------------------------------------------------------------------------------

def test_no_tripledes_warnings_escape() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        icc_mk = cg.derive_icc_mk(ISS_MK, PAN, PSN)
        arqc = cg.generate_arqc(icc_mk, sample())
        cg.generate_arpc(ISS_MK, PAN, PSN, arqc)
        cg.key_check_value(icc_mk)
    assert caught == []


def test_no_warning_filter_is_touched_from_threads() -> None:
    # pyemv needed its TDES deprecations silenced with warnings.catch_warnings, which is
    # process-global: concurrent threads leaked the warnings and could leave the filter list
    # changed. The constructions on cryptography's three-key TDES raise none at all.
    import threading

    before = list(warnings.filters)
    icc_mk = cg.derive_icc_mk(ISS_MK, PAN, PSN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=lambda: [cg.generate_arqc(icc_mk, sample(atc=n)) for n in range(200)])
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert caught == []
    assert warnings.filters == before


def _pyemv_quietly(fn, *args):
    """The reference implementation, with its TDES deprecation warnings silenced (test only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return fn(*args)


_key16 = st.binary(min_size=16, max_size=16)


@settings(max_examples=300, deadline=None)
@given(issuer_mk=_key16, pan=st.from_regex(r"[0-9]{12,19}", fullmatch=True),
       psn=st.integers(0, 99), r=st.binary(min_size=8, max_size=8), data=st.binary(max_size=80),
       arc=st.binary(min_size=2, max_size=2))
def test_constructions_equal_pyemv(issuer_mk, pan, psn, r, data, arc) -> None:
    """Option A ICC MK, common session key, ISO 9797-1 MAC algorithm 3 (every padding length,
    one block to many) and ARPC method 1 equal pyemv's for any keys and data."""
    from pyemv import ac, kd, tools

    icc_mk = cg.derive_icc_mk(issuer_mk, pan, psn)
    assert icc_mk == _pyemv_quietly(kd.derive_icc_mk_a, issuer_mk, pan, f"{psn:02d}")
    sk = cg.derive_session_key_from_r(icc_mk, r)
    assert sk == _pyemv_quietly(kd.derive_common_sk, icc_mk, r)
    assert cg.compute_ac(sk, data) == _pyemv_quietly(ac.generate_ac, sk, data, ac.PaddingType.EMV)
    arqc = cg.compute_ac(sk, data)
    assert cg.compute_arpc(icc_mk, arqc, arc) == _pyemv_quietly(ac.generate_arpc_1, icc_mk, arqc, arc)
    assert cg.key_check_value(icc_mk, 3) == _pyemv_quietly(tools.key_check_digits, icc_mk, 3).hex().upper()
