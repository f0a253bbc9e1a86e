"""In-process simulated cards: the physical citizen card (APDU level) and the phone's virtual card.

No I/O: a PC/SC bridge (vpcd) can wrap :meth:`SimulatedCard.transmit` and :data:`SimulatedCard.atr`
unchanged.

Physical card, :class:`SimulatedCard`
-------------------------------------
Two applications, selected by name (``00 A4 04 00 Lc AID``):

* social security (SSSE), AID ``7378312E73682EC9E7BBE1B1A3D5CF`` ("sx1.sh." + GBK 社会保障):
  READ RECORD ``00 B2 <item> <(SFI << 3) | 4>`` returns one data item as ``item | len | value``:
  EF05 (SFI 5): item 01 card identifier (32 ASCII), 07 card number (9 ASCII);
  EF06 (SFI 6): item 08 social-security number (18 ASCII, GB 11643), 09 name (GBK).
* payment, AID ``A000000333010101``:
  GENERATE AC ``80 AE <P1> 00 17 <CDOL1>`` with CDOL1 = amount (6 BCD) | currency (2) |
  date (3, YYMMDD) | UN (4) | terminal id (8 ASCII), see
  :meth:`card.cryptogram.TransactionData.cdol1`. The card increments its ATC, and answers
  response format 2: ``77 [9F27 CID, 9F36 ATC, 9F26 AC, 82 AIP]`` (the AIP is added because this
  minimal card has no GET PROCESSING OPTIONS). It always goes online: CID 80 (ARQC), or 00 (AAC)
  when P1 asks for an AAC.
  EXTERNAL AUTHENTICATE ``00 82 00 00 0A <ARPC 8><ARC 2>`` (issuer authentication data, tag 91
  value) checks the ARPC for the last ARQC: 9000 or 6300.
  GET DATA ``80 CA 9F 36`` returns the ATC.

Status words: 9000 ok, 6300 authentication failed, 6700 wrong length, 6A80 bad data, 6A82 file or
application not found, 6A83 record not found, 6A86 bad P1-P2, 6985 conditions of use not
satisfied (wrong application selected, ATC exhausted, no ARQC pending), 6D00 unknown INS, 6E00
unknown CLA.

Virtual card, :class:`VirtualCardApp`
------------------------------------
Makes EMVCo CPM QR codes whose cryptogram covers PAN/PSN (through the key), ATC, UN, AIP and the
issue time; see :mod:`card.cpm` for the format and :func:`card.cpm.verify_cpm_cryptogram`.
"""

from __future__ import annotations

import json
import os
import random
import threading
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from card.cpm import PAYMENT_AID, Tlv, build_cpm_payload, encode_tlv, make_cpm_cryptogram
from card.cryptogram import (
    ATC_MAX,
    CDOL1_LENGTH,
    DEFAULT_AIP,
    CryptogramError,
    TransactionData,
    derive_icc_mk,
    generate_arqc,
    verify_arpc,
)
from card.identity import synthetic_name, synthetic_pan, synthetic_sfz

__all__ = [
    "SSSE_AID",
    "PAYMENT_AID",
    "ATR",
    "SW_OK",
    "CardError",
    "SimulatedCard",
    "VirtualCardApp",
    "select_apdu",
    "read_record_apdu",
    "generate_ac_apdu",
    "external_authenticate_apdu",
    "split_response",
]

#: Social-security application: "sx1.sh." followed by the GBK bytes of 社会保障.
SSSE_AID = bytes.fromhex("7378312E73682EC9E7BBE1B1A3D5CF")
#: ATR of the simulated card: T=0, no interface bytes beyond TB1/TC1, historical bytes "SSCARD01".
ATR = bytes.fromhex("3B680000") + b"SSCARD01"

SW_OK = 0x9000
SW_AUTH_FAILED = 0x6300
SW_WRONG_LENGTH = 0x6700
SW_BAD_DATA = 0x6A80
SW_NOT_FOUND = 0x6A82
SW_RECORD_NOT_FOUND = 0x6A83
SW_BAD_P1P2 = 0x6A86
SW_CONDITIONS = 0x6985
SW_INS_UNKNOWN = 0x6D00
SW_CLA_UNKNOWN = 0x6E00

EF05_SFI = 5
EF06_SFI = 6
ITEM_CARD_ID = 0x01
ITEM_CARD_NUMBER = 0x07
ITEM_SSN = 0x08
ITEM_NAME = 0x09


class CardError(Exception):
    """A card command failed; ``sw`` is the ISO/IEC 7816-4 status word (e.g. 0x6A82)."""

    def __init__(self, sw: int, message: str = "") -> None:
        super().__init__(f"SW {sw:04X}" + (f": {message}" if message else ""))
        self.sw = sw


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


def split_response(response: bytes) -> tuple[bytes, int]:
    """Split a response APDU into ``(data, SW1SW2 as int)``; ValueError if shorter than 2 bytes."""
    if len(response) < 2:
        raise ValueError("response APDU shorter than its status word")
    return response[:-2], int.from_bytes(response[-2:], "big")


def select_apdu(aid: bytes) -> bytes:
    """SELECT by DF name, first occurrence: ``00 A4 04 00 Lc AID 00``."""
    return bytes([0x00, 0xA4, 0x04, 0x00, len(aid)]) + aid + b"\x00"


def read_record_apdu(record: int, sfi: int) -> bytes:
    """READ RECORD ``00 B2 record (sfi<<3)|4 00``."""
    return bytes([0x00, 0xB2, record, (sfi << 3) | 4, 0x00])


def generate_ac_apdu(data: TransactionData, *, p1: int = 0x80) -> bytes:
    """GENERATE AC ``80 AE p1 00 17 <data.cdol1()> 00`` (p1 0x80 asks for an ARQC)."""
    cdol1 = data.cdol1()
    return bytes([0x80, 0xAE, p1, 0x00, len(cdol1)]) + cdol1 + b"\x00"


def external_authenticate_apdu(arpc: bytes, arc: bytes) -> bytes:
    """EXTERNAL AUTHENTICATE ``00 82 00 00 0A <ARPC><ARC>`` (issuer authentication data)."""
    return bytes([0x00, 0x82, 0x00, 0x00, 10]) + arpc + arc


@dataclass(frozen=True, slots=True)
class _Apdu:
    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes
    le: int | None


def _parse_apdu(apdu: bytes) -> _Apdu:
    """Short APDUs, cases 1-4 (ISO/IEC 7816-3 12.1); extended lengths are refused (6700)."""
    if len(apdu) < 4:
        raise CardError(SW_WRONG_LENGTH, "APDU shorter than its header")
    cla, ins, p1, p2 = apdu[:4]
    body = apdu[4:]
    if not body:
        return _Apdu(cla, ins, p1, p2, b"", None)
    if len(body) == 1:
        return _Apdu(cla, ins, p1, p2, b"", body[0] or 256)
    lc = body[0]
    if lc == 0:
        raise CardError(SW_WRONG_LENGTH, "extended length APDUs are not supported")
    if len(body) == 1 + lc:
        return _Apdu(cla, ins, p1, p2, bytes(body[1:]), None)
    if len(body) == 2 + lc:
        return _Apdu(cla, ins, p1, p2, bytes(body[1:1 + lc]), body[-1] or 256)
    raise CardError(SW_WRONG_LENGTH, "Lc does not match the data")


class SimulatedCard:
    """A citizen card with the SSSE and payment applications, answering APDUs like the real one.

    The issuer personalises it with the ICC master key derived from ``issuer_mk`` (EMV option A
    over ``pan`` and ``psn``); the issuer master key itself is not kept. ``card_id`` (32 ASCII),
    ``card_number`` (9 ASCII), ``ssn`` (GB 11643) and ``name`` (Chinese, stored GBK) fill EF05/EF06.
    The ATC starts at ``atc`` (default 0) and is incremented before each cryptogram, so the first
    transaction carries ATC 1.
    """

    atr = ATR

    def __init__(self, *, issuer_mk: bytes, pan: str, psn: str = "00", card_id: str,
                 card_number: str, ssn: str, name: str, atc: int = 0,
                 aip: bytes = DEFAULT_AIP) -> None:
        self.pan = pan
        self.psn = psn
        self.icc_mk = derive_icc_mk(issuer_mk, pan, psn)
        if not 0 <= atc <= ATC_MAX:
            raise ValueError("ATC must be 0..65535")
        self.atc = atc
        self.aip = aip
        self.card_id = card_id
        self.card_number = card_number
        self.ssn = ssn
        self.name = name
        self._records = {
            EF05_SFI: {ITEM_CARD_ID: card_id.encode("ascii"),
                       ITEM_CARD_NUMBER: card_number.encode("ascii")},
            EF06_SFI: {ITEM_SSN: ssn.encode("ascii"), ITEM_NAME: name.encode("gbk")},
        }
        self.selected: bytes | None = None
        self.last_arqc: bytes | None = None
        self.last_arc: bytes | None = None
        self.issuer_authenticated: bool | None = None

    @classmethod
    def synthetic(cls, rng: random.Random, issuer_mk: bytes, *, region: str = "330302",
                  psn: str = "01") -> "SimulatedCard":
        """A card with synthetic holder data drawn from ``rng`` (test BIN 999933, see identity)."""
        ssn = synthetic_sfz(rng, region=region)
        card_id = region + "D156000005" + "".join(rng.choice("0123456789ABCDEF") for _ in range(16))
        card_number = "A" + "".join(str(rng.randrange(10)) for _ in range(8))
        return cls(issuer_mk=issuer_mk, pan=synthetic_pan(rng), psn=psn, card_id=card_id,
                   card_number=card_number, ssn=ssn, name=synthetic_name(rng))

    # -- Python-level operations (also used by transmit) ----------------------------------

    def reset(self) -> None:
        """Power cycle: forget the selected application and any pending ARQC; keep the ATC."""
        self.selected = None
        self.last_arqc = None

    def select(self, aid: bytes) -> bytes:
        """Select an application by name; returns its FCI (6F [84 AID, A5 [50 label]]).

        Raises :class:`CardError` 6A82 for an unknown AID.
        """
        labels = {SSSE_AID: b"SSSE", PAYMENT_AID: b"CITIZEN CARD"}
        if aid not in labels:
            self.selected = None
            raise CardError(SW_NOT_FOUND, "application not found")
        self.selected = aid
        return encode_tlv(Tlv(0x6F, children=(
            Tlv(0x84, aid), Tlv(0xA5, children=(Tlv(0x50, labels[aid]),)))))

    def read_record(self, record: int, sfi: int) -> bytes:
        """One SSSE data item as ``item | len | value`` (EF05: 01, 07; EF06: 08, 09).

        Raises :class:`CardError` 6985 when the SSSE application is not selected, 6A82 for an
        unknown SFI, 6A83 for an unknown item.
        """
        if self.selected != SSSE_AID:
            raise CardError(SW_CONDITIONS, "social-security application not selected")
        if sfi not in self._records:
            raise CardError(SW_NOT_FOUND, f"no EF with SFI {sfi}")
        value = self._records[sfi].get(record)
        if value is None:
            raise CardError(SW_RECORD_NOT_FOUND, f"no item {record:02X} in SFI {sfi}")
        return encode_tlv(Tlv(record, value))

    def generate_ac(self, amount_fen: int, terminal_id: str, txn_date: date,
                    unpredictable_number: bytes, *, currency_code: str = "0156"
                    ) -> tuple[TransactionData, bytes]:
        """Increment the ATC and MAC the transaction: returns ``(data, ARQC 8 bytes)``.

        Raises :class:`CardError` 6985 when the ATC is exhausted, 6A80 for malformed input.
        """
        if self.atc >= ATC_MAX:
            raise CardError(SW_CONDITIONS, "ATC exhausted")
        try:
            data = TransactionData(
                amount_authorised_fen=amount_fen, txn_date=txn_date,
                unpredictable_number=unpredictable_number, atc=self.atc + 1,
                terminal_id=terminal_id, currency_code=currency_code, aip=self.aip)
        except CryptogramError as exc:
            raise CardError(SW_BAD_DATA, str(exc)) from None
        self.atc += 1
        arqc = generate_arqc(self.icc_mk, data)
        self.last_arqc = arqc
        self.last_arc = None
        self.issuer_authenticated = None
        return data, arqc

    def process_arpc(self, arpc: bytes, arc: bytes) -> bool:
        """Verify the issuer's ARPC (method 1) for the last ARQC; True when it is authentic.

        Authenticity says nothing about approval: read the ARC (``b"00"`` approves). The pending
        ARQC is consumed either way; False also when none is pending or the input is malformed.
        """
        arqc, self.last_arqc = self.last_arqc, None
        if arqc is None:
            self.issuer_authenticated = False
            return False
        try:
            ok = verify_arpc(self.icc_mk, arqc, arc, arpc)
        except CryptogramError:
            ok = False
        self.issuer_authenticated = ok
        self.last_arc = arc if ok else None
        return ok

    # -- APDU interface ------------------------------------------------------------------

    def transmit(self, apdu: bytes) -> bytes:
        """Process one command APDU; returns response data followed by SW1 SW2. Never raises."""
        try:
            cmd = _parse_apdu(bytes(apdu))
            return self._dispatch(cmd) + _sw(SW_OK)
        except CardError as exc:
            return _sw(exc.sw)

    def _dispatch(self, cmd: _Apdu) -> bytes:
        if cmd.cla == 0x00 and cmd.ins == 0xA4:
            if (cmd.p1, cmd.p2) != (0x04, 0x00):
                raise CardError(SW_BAD_P1P2)
            if not cmd.data:
                raise CardError(SW_WRONG_LENGTH)
            return self.select(cmd.data)
        if cmd.cla == 0x00 and cmd.ins == 0xB2:
            if cmd.p2 & 0x07 != 0x04 or cmd.p1 == 0:
                raise CardError(SW_BAD_P1P2)
            return self.read_record(cmd.p1, cmd.p2 >> 3)
        if cmd.cla == 0x80 and cmd.ins == 0xAE:
            return self._generate_ac_apdu(cmd)
        if cmd.cla == 0x00 and cmd.ins == 0x82:
            if self.selected != PAYMENT_AID:
                raise CardError(SW_CONDITIONS, "payment application not selected")
            if len(cmd.data) != 10:
                raise CardError(SW_WRONG_LENGTH)
            if self.last_arqc is None:
                raise CardError(SW_CONDITIONS, "no ARQC pending")
            if not self.process_arpc(cmd.data[:8], cmd.data[8:]):
                raise CardError(SW_AUTH_FAILED, "ARPC does not verify")
            return b""
        if cmd.cla == 0x80 and cmd.ins == 0xCA:
            if (cmd.p1, cmd.p2) != (0x9F, 0x36):
                raise CardError(SW_NOT_FOUND, "data object not available")
            return encode_tlv(Tlv(0x9F36, self.atc.to_bytes(2, "big")))
        if cmd.cla not in (0x00, 0x80):
            raise CardError(SW_CLA_UNKNOWN)
        raise CardError(SW_INS_UNKNOWN)

    def _generate_ac_apdu(self, cmd: _Apdu) -> bytes:
        if self.selected != PAYMENT_AID:
            raise CardError(SW_CONDITIONS, "payment application not selected")
        if cmd.p2 != 0x00 or cmd.p1 & 0x3F:
            raise CardError(SW_BAD_P1P2)
        if len(cmd.data) != CDOL1_LENGTH:
            raise CardError(SW_WRONG_LENGTH)
        try:
            parsed = TransactionData.from_cdol1(cmd.data, atc=0, aip=self.aip)
        except CryptogramError as exc:
            raise CardError(SW_BAD_DATA, str(exc)) from None
        _, ac = self.generate_ac(parsed.amount_authorised_fen, parsed.terminal_id,
                                 parsed.txn_date, parsed.unpredictable_number,
                                 currency_code=parsed.currency_code)
        cid = 0x00 if cmd.p1 & 0xC0 == 0x00 else 0x80  # AAC asked -> AAC, else ARQC (online)
        if cid == 0x00:
            self.last_arqc = None
        return encode_tlv(Tlv(0x77, children=(
            Tlv(0x9F27, bytes([cid])), Tlv(0x9F36, self.atc.to_bytes(2, "big")),
            Tlv(0x9F26, ac), Tlv(0x82, self.aip))))


class VirtualCardApp:
    """The phone app's virtual card: makes single-use EMVCo CPM QR codes valid ~60 s.

    Personalised like the physical card with the ICC master key derived from ``issuer_mk``
    (``pan`` may be a payment token standing for the PAN). ``cardholder_name`` is the ASCII
    (pinyin) name for tag 5F20, or None.
    """

    def __init__(self, *, issuer_mk: bytes, pan: str, psn: str = "00",
                 cardholder_name: str | None = None, label: str = "CITIZEN CARD",
                 atc: int = 0, aip: bytes = DEFAULT_AIP) -> None:
        self.pan = pan
        self.psn = psn
        self.icc_mk = derive_icc_mk(issuer_mk, pan, psn)
        self.cardholder_name = cardholder_name
        self.label = label
        if not 0 <= atc <= ATC_MAX:
            raise ValueError("ATC must be 0..65535")
        self.atc = atc
        self.aip = aip

    def make_qr(self, now_s: int, rng: random.Random) -> str:
        """A fresh CPM payload (base64 text) issued at ``now_s`` (Unix seconds).

        Increments the ATC; the 4-byte UN comes from ``rng`` (production passes
        ``random.SystemRandom()``). The cryptogram covers PAN/PSN, ATC, UN, AIP and ``now_s``
        (see :mod:`card.cpm`). Raises ``ValueError`` when the ATC is exhausted.
        """
        if self.atc >= ATC_MAX:
            raise ValueError("ATC exhausted: the virtual card must be re-personalised")
        atc = self.atc + 1
        un = rng.getrandbits(32).to_bytes(4, "big")
        cryptogram, iad = make_cpm_cryptogram(self.icc_mk, issued_at_s=now_s, atc=atc,
                                              unpredictable_number=un, aip=self.aip)
        self.atc = atc
        return build_cpm_payload(pan=self.pan, psn=self.psn, cryptogram=cryptogram, atc=atc,
                                 unpredictable_number=un, iad=iad, label=self.label,
                                 cardholder_name=self.cardholder_name, aip=self.aip)


# --------------------------------------------------------------------------- card state on disk
#: One lock per process for the state file's read-merge-write, beside a lock file that
#: serialises it between processes (fcntl.flock).
_STATE_LOCK = threading.Lock()


class CardStateError(RuntimeError):
    """The simulated cards' state file cannot be read or written; the message names it."""


def card_state_path(keys_file: str | os.PathLike[str]) -> Path:
    """Where the simulated cards of the city whose test secrets are in ``keys_file`` keep their
    ATCs: beside it, ``<keys file>.sim-cards.json`` (never the keys file itself)."""
    keys = Path(keys_file)
    return keys.parent / (keys.name + ".sim-cards.json")


def load_card_state(path: Path) -> dict[str, int]:
    """PAN -> the last ATC that simulated card used ({} when no simulator has run yet).
    Raises :class:`CardStateError` naming the file when it is not a JSON object of PAN -> ATC
    (0..65535)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CardStateError(f"cannot read the simulated cards' counters in {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or not all(
                isinstance(k, str) and type(v) is int and 0 <= v <= ATC_MAX for k, v in doc.items()):
            raise ValueError("expected a JSON object of PAN -> ATC (0..65535)")
    except ValueError as exc:
        raise CardStateError(f"{path} does not hold the simulated cards' counters ({exc}); it is written by "
                             "the simulators only: restore it, or set the city up again") from None
    return doc


def save_card_state(path: Path, atcs: dict[str, int]) -> None:
    """Merge ``atcs`` (PAN -> last ATC used) into the state file, keeping the higher ATC of
    each card, atomically (write a temporary file, then rename) and under a lock shared with
    other processes. A real card keeps its ATC in its own memory; the simulated ones keep it
    here, so that the day simulator (``citizencard day``) and the locust cashiers
    (``benchmarks/locustfile.py``) never present a counter the engine has already seen, however
    often and in whatever order they run on one city. Raises :class:`CardStateError` naming the
    file when it cannot be written."""
    import fcntl

    try:
        with _STATE_LOCK:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_name(path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                state = load_card_state(path)
                for pan, atc in atcs.items():
                    state[pan] = max(atc, state.get(pan, 0))
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(state, sort_keys=True))
                tmp.replace(path)
    except OSError as exc:
        raise CardStateError(f"cannot write the simulated cards' counters to {path}: {exc.strerror or exc}") from None
