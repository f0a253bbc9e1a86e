"""EMV application cryptograms with Common Session Key derivation (EMV 4.3 Book 2).

Key hierarchy (all keys double-length TDES, 16 bytes, odd parity):

* issuer master key ``MK_ISS`` (held by the host / HSM) ->
* ICC master key ``MK_AC`` = EMV option A over PAN and PAN sequence number (Book 2 Annex A1.4.1);
  the issuer writes it into the card at personalisation ->
* session key ``SK_AC`` = Common Session Key derivation (Book 2 Annex A1.3.1) with
  ``R = ATC || 00 00 00 00 00 00``.

The card MACs :class:`TransactionData` with ``SK_AC`` (ISO/IEC 9797-1 algorithm 3, padding
method 2; Book 2 section 8.1 and Annex A1.2) into the 8-byte ARQC. The host recomputes it from the
issuer master key and compares in constant time (:func:`verify_arqc`), keeps the highest ATC per
card (:func:`check_atc`), and answers with an ARPC.

Decisions
---------
* **ARPC**: method 1 (Book 2 section 8.2.1), ``ARPC = TDES(MK_AC)[ARQC xor (ARC || 00*6)]``.
  Book 2 keys it with ``SK_AC``; we key it with the ICC master key ``MK_AC``, as M/Chip CVN 16/17
  and the HSM-checked conformance vector do, so that vector checks our whole chain end to end.
* **ARC** (authorisation response code, 2 bytes, ``an 2`` ISO 8583 codes in ASCII):
  :data:`ARC_APPROVED` ``"00"`` (hex 3030), :data:`ARC_DECLINED` ``"05"`` (3035, do not honour),
  :data:`ARC_INSUFFICIENT_FUNDS` ``"51"`` (3531), :data:`ARC_CARD_AUTH_FAILED` ``"Q1"`` (5131,
  the cryptogram did not verify). Only ``"00"`` approves.
* **Terminal binding**: the terminal identification (tag 9F1C, an 8) is appended after the
  Annex D recommended minimum data set, followed by any issuer application data (9F10), as
  CDOL1-style concatenation; see :meth:`TransactionData.to_bytes`.
* **ATC**: a value not above the last one seen is a replay; a jump of more than
  :data:`ATC_JUMP_MAX` is refused too (a card cannot plausibly have done that many transactions
  the host never saw, and the bound stops an attacker from burning the 16-bit counter).

The block cipher is ``cryptography``'s TDES (``hazmat.decrepit``), always with a three-key
(24-byte) schedule: a double-length key ``K1 K2`` runs as ``K1 K2 K1`` and single DES as
``K K K``, which are the same permutations. The EMV constructions on top of it (the key
derivations, ISO/IEC 9797-1 MAC algorithm 3, ARPC method 1, key parity) are ours; the test
suite checks them against ``pyemv`` and its published vectors. (We used to call ``pyemv``
itself, which reaches the deprecated two-key and single-key TDES and needs its warnings
silenced, and ``warnings.catch_warnings`` is process-global: under concurrent threads the
deprecation messages leaked and the filter list could be left changed. No warning is raised now.)
"""

from __future__ import annotations

import functools
import hmac
import re
from dataclasses import dataclass
from datetime import date
from enum import StrEnum

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from ledger.money import MoneyError, check_amount

__all__ = [
    "ARC_APPROVED",
    "ARC_DECLINED",
    "ARC_INSUFFICIENT_FUNDS",
    "ARC_CARD_AUTH_FAILED",
    "ATC_MAX",
    "ATC_JUMP_MAX",
    "AMOUNT_N12_MAX",
    "CNY_NUMERIC",
    "CHINA_NUMERIC",
    "DEFAULT_AIP",
    "CDOL1_LENGTH",
    "CryptogramError",
    "CryptogramResult",
    "TransactionData",
    "key_check_value",
    "derive_icc_mk",
    "session_key_r",
    "derive_session_key",
    "derive_session_key_from_r",
    "compute_ac",
    "compute_arpc",
    "generate_arqc",
    "verify_arqc",
    "generate_arpc",
    "verify_arpc",
    "arc_is_approved",
    "check_atc",
    "check_arqc",
]

ARC_APPROVED = b"00"
ARC_DECLINED = b"05"
ARC_INSUFFICIENT_FUNDS = b"51"
ARC_CARD_AUTH_FAILED = b"Q1"

#: The ATC is 2 bytes (tag 9F36).
ATC_MAX = 0xFFFF
#: Largest accepted step between the last ATC seen by the host and a new one.
ATC_JUMP_MAX = 1000
#: derived ICC master keys kept in memory (see derive_icc_mk)
ICC_MK_CACHE_MAX = 65536
#: Amount, authorised (9F02) is n 12: at most 999 999 999 999 fen.
AMOUNT_N12_MAX = 10**12 - 1
#: ISO 4217 numeric code of CNY and ISO 3166-1 numeric code of China, as n 3 padded to 4 digits.
CNY_NUMERIC = "0156"
CHINA_NUMERIC = "0156"
#: Application Interchange Profile (82) of our cards: cardholder verification, terminal risk
#: management and issuer authentication supported (byte 1 = 0x1C).
DEFAULT_AIP = bytes.fromhex("1C00")
#: Length of the GENERATE AC command data of our cards (see :meth:`TransactionData.cdol1`).
CDOL1_LENGTH = 6 + 2 + 3 + 4 + 8

_TERMINAL_ID = re.compile(r"[\x20-\x7e]{8}")
_NUMERIC4 = re.compile(r"[0-9]{4}")


class CryptogramError(ValueError):
    """Malformed cryptographic input: wrong key length, PAN, ATC, field size or encoding."""


class CryptogramResult(StrEnum):
    """Closed set of verification outcomes; the string values are stable API codes."""

    OK = "ok"
    ARQC_MISMATCH = "arqc_mismatch"
    ATC_REPLAYED = "atc_replayed"
    ATC_JUMP_TOO_LARGE = "atc_jump_too_large"
    CODE_EXPIRED = "code_expired"
    CODE_NOT_YET_VALID = "code_not_yet_valid"


_ECB = modes.ECB()
_ZERO_BLOCK = bytes(8)
#: byte -> the same byte with its low bit set so that it has an odd number of 1 bits (DES parity)
_ODD_PARITY = bytes(b if bin(b).count("1") % 2 else b ^ 1 for b in range(256))


def _tdes_ecb(key16: bytes, data: bytes) -> bytes:
    """TDES-EDE encryption of whole 8-byte blocks under the double-length key ``K1 K2``."""
    encryptor = Cipher(TripleDES(key16 + key16[:8]), _ECB).encryptor()
    return encryptor.update(data)


def _des_cbc_mac(key8: bytes, data: bytes) -> bytes:
    """Single-DES CBC over whole blocks with a zero IV (as TDES ``K K K``): the last block."""
    encryptor = Cipher(TripleDES(key8 * 3), modes.CBC(_ZERO_BLOCK)).encryptor()
    return encryptor.update(data)[-8:]


def _odd_parity(key: bytes) -> bytes:
    """Each byte's low bit adjusted for odd parity, as DES keys are written."""
    return key.translate(_ODD_PARITY)


def _mac_iso9797_3(key16: bytes, data: bytes) -> bytes:
    """ISO/IEC 9797-1 MAC algorithm 3 (retail MAC), padding method 2, 8 bytes (Book 2 A1.2.1):
    DES-CBC under K1 over all blocks but the last, then TDES ``K1 K2 K1`` on the last block
    XOR that chain (which is DES(K1) of it, then DES⁻¹(K2), then DES(K1))."""
    padded = data + b"\x80" + bytes(-(len(data) + 1) % 8)
    chain = _des_cbc_mac(key16[:8], padded[:-8]) if len(padded) > 8 else _ZERO_BLOCK
    last = bytes(a ^ b for a, b in zip(padded[-8:], chain))
    return _tdes_ecb(key16, last)


def _bcd(digits: str) -> bytes:
    return bytes.fromhex(digits)


def _check_key(key: object, what: str) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != 16:
        raise CryptogramError(f"{what} must be 16 bytes (double-length TDES key)")
    return bytes(key)


def _check_pan(pan: object) -> str:
    if not isinstance(pan, str) or not 12 <= len(pan) <= 19 or not pan.isascii() or not pan.isdigit():
        raise CryptogramError("PAN must be 12 to 19 ASCII digits")
    return pan


def _check_psn(psn: object) -> str:
    if isinstance(psn, int) and not isinstance(psn, bool) and 0 <= psn <= 99:
        return f"{psn:02d}"
    if isinstance(psn, str) and len(psn) == 2 and psn.isascii() and psn.isdigit():
        return psn
    raise CryptogramError("PAN sequence number must be two digits (str) or an int 0..99")


def _check_atc_value(atc: object) -> int:
    if not isinstance(atc, int) or isinstance(atc, bool) or not 0 <= atc <= ATC_MAX:
        raise CryptogramError(f"ATC must be an int 0..{ATC_MAX}")
    return atc


def _check_bytes(value: object, length: int, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != length:
        raise CryptogramError(f"{what} must be {length} bytes")
    return bytes(value)


@dataclass(frozen=True, slots=True)
class TransactionData:
    """The data an ARQC covers (EMV Book 2 Annex D, recommended minimum set, plus terminal id).

    Amounts are int fen (n 12, 0..:data:`AMOUNT_N12_MAX`); ``currency_code``/``country_code`` are
    4-digit numeric codes ("0156" CNY / China); ``tvr`` 5 bytes; ``txn_date`` the terminal's local
    date; ``txn_type`` 2 digits ("00" purchase); ``unpredictable_number`` 4 bytes from the terminal's
    random source; ``aip`` 2 bytes; ``atc`` 0..65535; ``terminal_id`` 8 printable ASCII characters
    (9F1C); ``iad`` issuer application data (9F10) covered by the MAC, empty for the physical card.
    Raises :class:`CryptogramError` on any malformed field.
    """

    amount_authorised_fen: int
    txn_date: date
    unpredictable_number: bytes
    atc: int
    terminal_id: str
    amount_other_fen: int = 0
    currency_code: str = CNY_NUMERIC
    country_code: str = CHINA_NUMERIC
    tvr: bytes = bytes(5)
    txn_type: str = "00"
    aip: bytes = DEFAULT_AIP
    iad: bytes = b""

    def __post_init__(self) -> None:
        for name in ("amount_authorised_fen", "amount_other_fen"):
            value = getattr(self, name)
            try:
                check_amount(value, field=name, allow_zero=True)
            except MoneyError as exc:
                raise CryptogramError(str(exc)) from None
            if value > AMOUNT_N12_MAX:
                raise CryptogramError(f"{name}: {value} does not fit n 12")
        for name in ("currency_code", "country_code"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _NUMERIC4.fullmatch(value):
                raise CryptogramError(f"{name} must be 4 digits, e.g. '0156'")
        if not isinstance(self.txn_date, date):
            raise CryptogramError("txn_date must be a datetime.date")
        if not 2000 <= self.txn_date.year <= 2049:
            raise CryptogramError("txn_date must be within 2000..2049 (YYMMDD, EMV year rule)")
        if not isinstance(self.txn_type, str) or not re.fullmatch(r"[0-9]{2}", self.txn_type):
            raise CryptogramError("txn_type must be 2 digits, e.g. '00' purchase")
        _check_bytes(self.tvr, 5, "TVR (95)")
        _check_bytes(self.unpredictable_number, 4, "unpredictable number (9F37)")
        _check_bytes(self.aip, 2, "AIP (82)")
        _check_atc_value(self.atc)
        if not isinstance(self.terminal_id, str) or not _TERMINAL_ID.fullmatch(self.terminal_id):
            raise CryptogramError("terminal_id must be 8 printable ASCII characters (9F1C an 8)")
        if not isinstance(self.iad, (bytes, bytearray)) or len(self.iad) > 32:
            raise CryptogramError("iad (9F10) must be at most 32 bytes")

    def to_bytes(self) -> bytes:
        """The MAC input: 9F02 | 9F03 | 9F1A | 95 | 5F2A | 9A | 9C | 9F37 | 82 | 9F36 | 9F1C | 9F10.

        The first ten are EMV Book 2 Annex D's recommended minimum (6+6+2+5+2+3+1+4+2+2 = 33
        bytes, amounts BCD n 12, date BCD YYMMDD); then the terminal id as 8 ASCII bytes, then
        the IAD bytes (if any) - values only, no tags or lengths, as a CDOL concatenation.
        """
        return b"".join((
            _bcd(f"{self.amount_authorised_fen:012d}"),
            _bcd(f"{self.amount_other_fen:012d}"),
            _bcd(self.country_code),
            bytes(self.tvr),
            _bcd(self.currency_code),
            _bcd(f"{self.txn_date:%y%m%d}"),
            _bcd(self.txn_type),
            bytes(self.unpredictable_number),
            bytes(self.aip),
            self.atc.to_bytes(2, "big"),
            self.terminal_id.encode("ascii"),
            bytes(self.iad),
        ))

    def cdol1(self) -> bytes:
        """The GENERATE AC command data our cards expect (:data:`CDOL1_LENGTH` = 23 bytes).

        9F02 amount (6, BCD) | 5F2A currency (2) | 9A date (3, YYMMDD) | 9F37 UN (4) | 9F1C
        terminal id (8 ASCII). The card supplies the rest (amount other 0, country 0156, TVR zero,
        type 00, its AIP and ATC).
        """
        return b"".join((
            _bcd(f"{self.amount_authorised_fen:012d}"),
            _bcd(self.currency_code),
            _bcd(f"{self.txn_date:%y%m%d}"),
            bytes(self.unpredictable_number),
            self.terminal_id.encode("ascii"),
        ))

    @classmethod
    def from_cdol1(cls, raw: bytes, *, atc: int, aip: bytes = DEFAULT_AIP) -> "TransactionData":
        """Rebuild the data a card MACed from its GENERATE AC command data and its ATC and AIP.

        Raises :class:`CryptogramError` when ``raw`` is not 23 bytes of valid BCD / ASCII.
        """
        raw = _check_bytes(raw, CDOL1_LENGTH, "GENERATE AC data (CDOL1)")
        amount_hex, currency, date_hex = raw[0:6].hex(), raw[6:8].hex(), raw[8:11].hex()
        if not (amount_hex + currency + date_hex).isdigit():
            raise CryptogramError("GENERATE AC data holds invalid BCD")
        try:
            txn_date = date(2000 + int(date_hex[0:2]), int(date_hex[2:4]), int(date_hex[4:6]))
            terminal_id = raw[15:23].decode("ascii")
        except (ValueError, UnicodeDecodeError):
            raise CryptogramError("GENERATE AC data holds an invalid date or terminal id") from None
        return cls(amount_authorised_fen=int(amount_hex), currency_code=currency,
                   txn_date=txn_date, unpredictable_number=raw[11:15], terminal_id=terminal_id,
                   atc=atc, aip=aip)


def key_check_value(key: bytes, length: int = 2) -> str:
    """Key check value: the first ``length`` bytes of TDES(key)[00*8], as upper-case hex."""
    key = _check_key(key, "key")
    if not 1 <= length <= 8:
        raise CryptogramError("a key check value is 1 to 8 bytes long")
    return _tdes_ecb(key, _ZERO_BLOCK)[:length].hex().upper()


def derive_icc_mk(issuer_mk: bytes, pan: str, psn: str | int = "00") -> bytes:
    """ICC master key MK_AC from the issuer master key, EMV Book 2 Annex A1.4.1 (option A).

    ``issuer_mk`` 16 bytes; ``pan`` 12..19 digits; ``psn`` the PAN sequence number (5F34) as two
    digits or an int 0..99. Uses the rightmost 16 digits of PAN || PSN. Returns 16 bytes.
    """
    issuer_mk = _check_key(issuer_mk, "issuer master key")
    return _derive_icc_mk(issuer_mk, _check_pan(pan), _check_psn(psn))


@functools.lru_cache(maxsize=ICC_MK_CACHE_MAX)
def _derive_icc_mk(issuer_mk: bytes, pan: str, psn: str) -> bytes:
    # Derived keys are kept (bounded, least recently used first out): the issuer key they
    # come from is in this process's memory anyway, and a card checks two cryptograms per
    # payment (ARQC in, ARPC out), each needing its MK_AC.
    # Option A (Book 2 A1.4.1): Y = the rightmost 16 digits of PAN || PSN (left-padded with
    # zeros); MK_AC = TDES(MK_ISS)[Y] || TDES(MK_ISS)[Y xor FF*8], parity adjusted.
    y = bytes.fromhex((pan + psn)[-16:].zfill(16))
    return _odd_parity(_tdes_ecb(issuer_mk, y + bytes(b ^ 0xFF for b in y)))


def session_key_r(atc: int) -> bytes:
    """Diversification value R = ATC || 00 00 00 00 00 00 for AC session keys (Book 2 A1.3.1)."""
    return _check_atc_value(atc).to_bytes(2, "big") + bytes(6)


def derive_session_key_from_r(icc_mk: bytes, r: bytes) -> bytes:
    """Common Session Key derivation (EMV Book 2 Annex A1.3.1) from an 8-byte ``r``; 16 bytes."""
    icc_mk = _check_key(icc_mk, "ICC master key")
    r = _check_bytes(r, 8, "diversification value R")
    # SK = TDES(MK)[R0 R1 F0 R3..R7] || TDES(MK)[R0 R1 0F R3..R7], parity adjusted.
    return _odd_parity(_tdes_ecb(icc_mk, r[:2] + b"\xf0" + r[3:] + r[:2] + b"\x0f" + r[3:]))


def derive_session_key(icc_mk: bytes, atc: int) -> bytes:
    """AC session key SK_AC for one transaction: CSK derivation with R = :func:`session_key_r`."""
    return derive_session_key_from_r(icc_mk, session_key_r(atc))


def compute_ac(session_key: bytes, data: bytes) -> bytes:
    """8-byte application cryptogram: ISO/IEC 9797-1 MAC algorithm 3, padding method 2 (Book 2 A1.2)."""
    session_key = _check_key(session_key, "session key")
    if not isinstance(data, (bytes, bytearray)):
        raise CryptogramError("AC data must be bytes")
    return _mac_iso9797_3(session_key, bytes(data))


def compute_arpc(key: bytes, arqc: bytes, arc: bytes) -> bytes:
    """ARPC method 1 (EMV Book 2 section 8.2.1): TDES(key)[ARQC xor (ARC || 00*6)], 8 bytes.

    ``key`` 16 bytes (we pass the ICC master key, see module notes), ``arqc`` 8 bytes, ``arc`` 2.
    """
    key = _check_key(key, "ARPC key")
    arqc = _check_bytes(arqc, 8, "ARQC")
    arc = _check_bytes(arc, 2, "ARC")
    return _tdes_ecb(key, bytes(a ^ b for a, b in zip(arqc, arc + bytes(6))))


def generate_arqc(icc_mk: bytes, data: TransactionData) -> bytes:
    """Card side: the 8-byte ARQC over ``data.to_bytes()`` with SK_AC derived from ``data.atc``."""
    if not isinstance(data, TransactionData):
        raise CryptogramError("data must be a TransactionData")
    return compute_ac(derive_session_key(icc_mk, data.atc), data.to_bytes())


def verify_arqc(issuer_mk: bytes, pan: str, psn: str | int, data: TransactionData,
                arqc: bytes) -> bool:
    """Host side: recompute the ARQC from the issuer master key; constant-time comparison.

    Returns False for a wrong cryptogram (including one of the wrong length); raises
    :class:`CryptogramError` for malformed keys, PAN, PSN or data.
    """
    expected = generate_arqc(derive_icc_mk(issuer_mk, pan, psn), data)
    if not isinstance(arqc, (bytes, bytearray)):
        return False
    return hmac.compare_digest(expected, bytes(arqc))


def generate_arpc(issuer_mk: bytes, pan: str, psn: str | int, arqc: bytes,
                  arc: bytes = ARC_APPROVED) -> bytes:
    """Host side: the 8-byte ARPC (method 1, keyed with the card's MK_AC) answering ``arqc``.

    The issuer authentication data sent to the card (tag 91) is ``ARPC || ARC``.
    """
    return compute_arpc(derive_icc_mk(issuer_mk, pan, psn), arqc, arc)


def verify_arpc(icc_mk: bytes, arqc: bytes, arc: bytes, arpc: bytes) -> bool:
    """Card side: does ``arpc`` authenticate the issuer's ``arc`` for our ``arqc``? Constant time."""
    expected = compute_arpc(icc_mk, arqc, arc)
    if not isinstance(arpc, (bytes, bytearray)):
        return False
    return hmac.compare_digest(expected, bytes(arpc))


def arc_is_approved(arc: bytes) -> bool:
    """True only for :data:`ARC_APPROVED` (``"00"``)."""
    return arc == ARC_APPROVED


def check_atc(last_atc: int | None, atc: int, *, jump_max: int = ATC_JUMP_MAX) -> CryptogramResult:
    """Pure ATC replay check: compare a card's new ATC with the highest one the host kept.

    ``last_atc`` None means no transaction seen yet (any ATC is fresh). Returns
    ``ATC_REPLAYED`` when ``atc <= last_atc``, ``ATC_JUMP_TOO_LARGE`` when
    ``atc - last_atc > jump_max``, else ``OK``. Raises :class:`CryptogramError` for ATCs
    outside 0..65535.
    """
    _check_atc_value(atc)
    if last_atc is None:
        return CryptogramResult.OK
    _check_atc_value(last_atc)
    if atc <= last_atc:
        return CryptogramResult.ATC_REPLAYED
    if atc - last_atc > jump_max:
        return CryptogramResult.ATC_JUMP_TOO_LARGE
    return CryptogramResult.OK


def check_arqc(issuer_mk: bytes, pan: str, psn: str | int, data: TransactionData, arqc: bytes,
               *, last_atc: int | None, jump_max: int = ATC_JUMP_MAX) -> CryptogramResult:
    """Host side in one call: ARQC first (``ARQC_MISMATCH``), then :func:`check_atc` on ``data.atc``.

    The caller stores ``data.atc`` as the card's new highest ATC only when the result is ``OK``.
    """
    if not verify_arqc(issuer_mk, pan, psn, data, arqc):
        return CryptogramResult.ARQC_MISMATCH
    return check_atc(last_atc, data.atc, jump_max=jump_max)
