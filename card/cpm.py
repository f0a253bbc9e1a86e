"""BER-TLV and the virtual card's QR payload (EMVCo QR Code Specification for Payment Systems,
Consumer-Presented Mode, "CPM").

BER-TLV (ISO/IEC 8825-1 as profiled by EMV Book 3 Annex B): our own small codec, because
``pyemv``'s decoder collapses repeated tags. Order and repeated tags are preserved; decoding is
strict and raises :class:`TLVError` for anything it does not fully understand.

CPM payload (QR text = base64 of BER-TLV)::

    85 "CPV01"                                   payload format indicator
    61 application template                      (one per application; we build one)
        4F AID, 50 label, 5A PAN (BCD, F-padded), 5F20 cardholder name (ASCII), 5F34 PSN
    62 common data template
        64 common data transparent template
            9F10 IAD, 9F26 cryptogram, 9F27 CID, 9F36 ATC, 9F37 UN, 82 AIP

How the virtual card's cryptogram is formed (decided here, checked by
:func:`verify_cpm_cryptogram`): a CPM code is made before any amount is known, so the ARQC
(EMV Book 2, as in :mod:`card.cryptogram`, keyed by the card's ICC master key and the ATC) covers
:class:`~card.cryptogram.TransactionData` with amount 0, currency/country 0156, TVR zero, type 00,
the date of issue (China Standard Time), a fresh 4-byte UN from the phone, the AIP, the ATC,
terminal id ``"00000000"`` (consumer-presented, no terminal yet), and the issuer application data
9F10, which carries the issue time::

    9F10 = 05 | 01 | issued_at (4 bytes, big-endian Unix seconds)
           len  format version "citizen card CPM v1"

The PAN and PSN are bound through the key derivation. A code is valid for ``validity_s``
(default :data:`CPM_VALIDITY_S` = 60 s) after its issue time; it pays once because every code
carries a new ATC and the host refuses an ATC not above the highest it kept (a code superseded by
a newer one that already paid is refused too). Label, AID and cardholder name are display data,
not covered by the cryptogram.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterable, Sequence

from card.cryptogram import (
    ATC_JUMP_MAX,
    ATC_MAX,
    CHINA_NUMERIC,
    CNY_NUMERIC,
    DEFAULT_AIP,
    CryptogramError,
    CryptogramResult,
    TransactionData,
    check_atc,
    derive_icc_mk,
    generate_arqc,
)

__all__ = [
    "TLV_LENGTH_MAX",
    "TLV_DEPTH_MAX",
    "TLV_TAG_BYTES_MAX",
    "CPM_TEXT_MAX",
    "CPM_VALIDITY_S",
    "CPM_CLOCK_SKEW_S",
    "CPM_TERMINAL_ID",
    "CPM_IAD_FORMAT",
    "PAYMENT_AID",
    "CHINA_TZ",
    "TLVError",
    "CpmError",
    "Tlv",
    "encode_tlv",
    "decode_tlv",
    "decode_tlv_one",
    "encode_pan_bcd",
    "decode_pan_bcd",
    "CpmApplication",
    "CpmPayload",
    "build_cpm_payload",
    "parse_cpm_payload",
    "cpm_iad",
    "decode_cpm_iad",
    "cpm_transaction_data",
    "make_cpm_cryptogram",
    "verify_cpm_cryptogram",
]

#: Largest value length accepted by the decoder (the encoder's long form stops at 82 xx xx).
TLV_LENGTH_MAX = 0xFFFF
#: Deepest nesting of constructed data objects accepted by the decoder.
TLV_DEPTH_MAX = 8
#: Longest tag accepted (EMV uses at most 2 bytes).
TLV_TAG_BYTES_MAX = 3
#: Longest QR text accepted by :func:`parse_cpm_payload` (a version 40-M QR holds 2331 bytes).
CPM_TEXT_MAX = 2400
#: Validity of a virtual card QR code after its issue time, seconds.
CPM_VALIDITY_S = 60
#: How far in the future a code's issue time may be (phone clock ahead of ours), seconds.
CPM_CLOCK_SKEW_S = 30
#: Terminal id covered by CPM cryptograms: none is known when the phone makes the code.
CPM_TERMINAL_ID = "00000000"
#: First two IAD bytes of our CPM codes: length of the rest (5) and format version 1.
CPM_IAD_FORMAT = b"\x05\x01"
#: The card's payment application (UnionPay debit).
PAYMENT_AID = bytes.fromhex("A000000333010101")
#: China Standard Time (no daylight saving): the date of a CPM code's issue.
CHINA_TZ = timezone(timedelta(hours=8), "CST")

_TAG_85 = 0x85
_TAG_61 = 0x61
_TAG_62 = 0x62
_TAG_63 = 0x63
_TAG_64 = 0x64


class TLVError(ValueError):
    """Malformed BER-TLV: truncation, trailing bytes, indefinite or over-long length, bad tag."""


class CpmError(ValueError):
    """A CPM QR payload is malformed or lacks a required data object (message says which)."""


# --------------------------------------------------------------------------------------------
# BER-TLV
# --------------------------------------------------------------------------------------------

def _tag_to_bytes(tag: int) -> bytes:
    """Encode and validate an int tag (``0x9F26`` -> ``9F 26``)."""
    if not isinstance(tag, int) or isinstance(tag, bool) or tag <= 0:
        raise TLVError(f"tag must be a positive int, got {tag!r}")
    raw = tag.to_bytes((tag.bit_length() + 7) // 8, "big")
    if len(raw) > TLV_TAG_BYTES_MAX:
        raise TLVError(f"tag {tag:X} is longer than {TLV_TAG_BYTES_MAX} bytes")
    multi = raw[0] & 0x1F == 0x1F
    if not multi and len(raw) != 1:
        raise TLVError(f"tag {tag:X}: first byte does not announce subsequent bytes")
    if multi:
        if len(raw) == 1:
            raise TLVError(f"tag {tag:X}: subsequent tag bytes missing")
        if any(b & 0x80 == 0 for b in raw[1:-1]) or raw[-1] & 0x80:
            raise TLVError(f"tag {tag:X}: bad continuation bits in subsequent bytes")
    return raw


def _length_to_bytes(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    if length <= 0xFF:
        return bytes([0x81, length])
    if length <= 0xFFFF:
        return bytes([0x82]) + length.to_bytes(2, "big")
    raise TLVError(f"value of {length} bytes is too long to encode (max 65535)")


@dataclass(frozen=True, slots=True)
class Tlv:
    """One BER-TLV data object: an int ``tag`` (e.g. ``0x9F26``), and either a primitive
    ``value`` (bytes) or, for a constructed tag (bit 6 of its first byte set), ``children``.

    Raises :class:`TLVError` for a malformed tag, for children on a primitive tag or a value on a
    constructed tag.
    """

    tag: int
    value: bytes = b""
    children: tuple["Tlv", ...] = field(default=())

    def __post_init__(self) -> None:
        raw = _tag_to_bytes(self.tag)
        if not isinstance(self.value, bytes):
            raise TLVError("value must be bytes")
        object.__setattr__(self, "children", tuple(self.children))
        if raw[0] & 0x20:
            if self.value:
                raise TLVError(f"constructed tag {self.tag:X} carries children, not a value")
            if not all(isinstance(c, Tlv) for c in self.children):
                raise TLVError("children must be Tlv objects")
        elif self.children:
            raise TLVError(f"primitive tag {self.tag:X} cannot have children")

    @property
    def constructed(self) -> bool:
        """True when bit 6 of the tag's first byte is set."""
        return bool(_tag_to_bytes(self.tag)[0] & 0x20)

    @property
    def tag_hex(self) -> str:
        """Upper-case hex of the tag, e.g. ``"9F26"``."""
        return _tag_to_bytes(self.tag).hex().upper()

    def find(self, tag: int) -> "Tlv | None":
        """First direct child with ``tag``, or None."""
        return next((c for c in self.children if c.tag == tag), None)

    def find_all(self, tag: int) -> list["Tlv"]:
        """All direct children with ``tag``, in order."""
        return [c for c in self.children if c.tag == tag]

    def encode(self) -> bytes:
        """This object as BER-TLV bytes (definite length, shortest form)."""
        content = b"".join(c.encode() for c in self.children) if self.constructed else self.value
        return _tag_to_bytes(self.tag) + _length_to_bytes(len(content)) + content


def encode_tlv(nodes: Tlv | Iterable[Tlv]) -> bytes:
    """Encode one data object or a sequence of them (concatenated) as BER-TLV bytes.

    Lengths use the short form below 128 and the long forms ``81 xx`` / ``82 xx xx`` above;
    raises :class:`TLVError` for a value over 65535 bytes.
    """
    if isinstance(nodes, Tlv):
        return nodes.encode()
    return b"".join(n.encode() for n in nodes)


def _decode(data: bytes, start: int, end: int, depth: int, length_max: int,
            depth_max: int) -> list[Tlv]:
    if depth > depth_max:
        raise TLVError(f"nesting deeper than {depth_max} levels")
    out: list[Tlv] = []
    i = start
    while i < end:
        # tag
        first = data[i]
        if first == 0x00:
            raise TLVError(f"offset {i}: tag byte 00 (padding / end-of-contents) not allowed")
        j = i + 1
        if first & 0x1F == 0x1F:
            while True:
                if j >= end:
                    raise TLVError(f"offset {i}: truncated multi-byte tag")
                b = data[j]
                j += 1
                if j - i > TLV_TAG_BYTES_MAX:
                    raise TLVError(f"offset {i}: tag longer than {TLV_TAG_BYTES_MAX} bytes")
                if not b & 0x80:
                    break
        tag = int.from_bytes(data[i:j], "big")
        # length
        if j >= end:
            raise TLVError(f"offset {i}: truncated before the length of tag {tag:X}")
        lb = data[j]
        j += 1
        if lb < 0x80:
            length = lb
        elif lb == 0x80:
            raise TLVError(f"offset {i}: indefinite length is not allowed")
        elif lb in (0x81, 0x82):
            n = lb & 0x7F
            if j + n > end:
                raise TLVError(f"offset {i}: truncated long-form length of tag {tag:X}")
            length = int.from_bytes(data[j:j + n], "big")
            j += n
        else:
            raise TLVError(f"offset {i}: length form {lb:02X} not supported (max 82 xx xx)")
        if length > length_max:
            raise TLVError(f"offset {i}: length {length} of tag {tag:X} exceeds {length_max}")
        if j + length > end:
            raise TLVError(f"offset {i}: value of tag {tag:X} truncated "
                           f"({length} bytes announced, {end - j} left)")
        if first & 0x20:
            children = _decode(data, j, j + length, depth + 1, length_max, depth_max)
            out.append(Tlv(tag, children=tuple(children)))
        else:
            out.append(Tlv(tag, value=bytes(data[j:j + length])))
        i = j + length
    return out


def decode_tlv(data: bytes, *, length_max: int = TLV_LENGTH_MAX,
               depth_max: int = TLV_DEPTH_MAX) -> list[Tlv]:
    """Decode a concatenation of BER-TLV data objects, constructed ones recursively.

    Accepts 1..3-byte tags, short and long (``81``, ``82``) definite lengths (non-minimal long
    forms are tolerated). Raises :class:`TLVError` on truncation, tag byte ``00``, indefinite
    length (``80``), longer length forms, a length over ``length_max``, nesting deeper than
    ``depth_max``, or a constructed value that is not itself exact BER-TLV.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TLVError("BER-TLV input must be bytes")
    data = bytes(data)
    return _decode(data, 0, len(data), 0, length_max, depth_max)


def decode_tlv_one(data: bytes, **limits: int) -> Tlv:
    """Decode exactly one data object; raises :class:`TLVError` if none or trailing bytes follow."""
    nodes = decode_tlv(data, **limits)
    if not nodes:
        raise TLVError("no data object")
    if len(nodes) > 1:
        raise TLVError(f"trailing bytes after tag {nodes[0].tag:X}")
    return nodes[0]


# --------------------------------------------------------------------------------------------
# CPM payload
# --------------------------------------------------------------------------------------------

def encode_pan_bcd(pan: str) -> bytes:
    """PAN as compressed numeric (cn, tag 5A): BCD digits padded on the right with ``F``."""
    if not isinstance(pan, str) or not 8 <= len(pan) <= 19 or not pan.isascii() or not pan.isdigit():
        raise CpmError("PAN must be 8 to 19 ASCII digits")
    return bytes.fromhex(pan + ("F" if len(pan) % 2 else ""))


def decode_pan_bcd(raw: bytes) -> str:
    """Inverse of :func:`encode_pan_bcd`; raises :class:`CpmError` for non-digits or bad padding."""
    digits = raw.hex().upper()
    stripped = digits.rstrip("F")
    if not stripped.isdigit() or not 8 <= len(stripped) <= 19 or len(digits) - len(stripped) > 1:
        raise CpmError(f"5A is not a valid F-padded BCD PAN: {digits}")
    return stripped


@dataclass(frozen=True, slots=True)
class CpmApplication:
    """One ``61`` application template: AID (4F), label (50), PAN (5A), name (5F20), PSN (5F34)."""

    aid: bytes
    label: str | None = None
    pan: str | None = None
    cardholder_name: str | None = None
    psn: str | None = None


@dataclass(frozen=True, slots=True)
class CpmPayload:
    """A parsed CPM QR payload.

    ``pan`` / ``psn`` / ``cardholder_name`` come from the common data template (62) when present,
    else from the first application carrying them. ``cryptogram`` (9F26, 8 bytes), ``atc``
    (9F36, int), ``unpredictable_number`` (9F37, 4 bytes), ``iad`` (9F10), ``cid`` (9F27) and
    ``aip`` (82) come from the 64 template in 62, else from a 63 template in the first 61.
    ``tree`` keeps every decoded data object in order, unknown ones included.
    """

    format_indicator: str
    applications: tuple[CpmApplication, ...]
    pan: str
    cryptogram: bytes
    atc: int
    unpredictable_number: bytes
    psn: str | None = None
    cardholder_name: str | None = None
    language_preference: str | None = None
    iad: bytes | None = None
    cid: int | None = None
    aip: bytes | None = None
    tree: tuple[Tlv, ...] = ()


def _ascii(node: Tlv | None, what: str) -> str | None:
    if node is None:
        return None
    try:
        return node.value.decode("ascii")
    except UnicodeDecodeError:
        raise CpmError(f"{what} is not ASCII text") from None


def _one(nodes: Sequence[Tlv], tag: int, where: str) -> Tlv | None:
    found = [n for n in nodes if n.tag == tag]
    if len(found) > 1:
        raise CpmError(f"tag {tag:X} appears {len(found)} times in {where}")
    return found[0] if found else None


def _psn(node: Tlv | None) -> str | None:
    if node is None:
        return None
    digits = node.value.hex()
    if len(node.value) != 1 or not digits.isdigit():
        raise CpmError("5F34 PAN sequence number must be one BCD byte")
    return digits


def _application(node: Tlv) -> CpmApplication:
    kids = node.children
    aid = _one(kids, 0x4F, "61")
    if aid is None:
        raise CpmError("application template 61 without an AID (4F)")
    if not 5 <= len(aid.value) <= 16:
        raise CpmError("AID (4F) must be 5 to 16 bytes")
    pan = _one(kids, 0x5A, "61")
    return CpmApplication(
        aid=aid.value,
        label=_ascii(_one(kids, 0x50, "61"), "application label (50)"),
        pan=decode_pan_bcd(pan.value) if pan is not None else None,
        cardholder_name=_ascii(_one(kids, 0x5F20, "61"), "cardholder name (5F20)"),
        psn=_psn(_one(kids, 0x5F34, "61")),
    )


def _fixed(node: Tlv | None, length: int, what: str) -> bytes:
    if node is None:
        raise CpmError(f"missing {what}")
    if len(node.value) != length:
        raise CpmError(f"{what} must be {length} bytes, got {len(node.value)}")
    return node.value


def parse_cpm_payload(text: str) -> CpmPayload:
    """Parse the QR text of an EMVCo CPM code (base64 of BER-TLV) into a :class:`CpmPayload`.

    Surrounding whitespace is ignored; the text must be strict standard base64 of at most
    :data:`CPM_TEXT_MAX` characters. Raises :class:`CpmError` (with the reason) for bad base64,
    malformed BER-TLV, a missing or non-first ``85``, a format indicator other than ``CPV01``, no
    ``61`` template, unknown top-level tags, repeated single-occurrence tags, a missing PAN, or a
    missing / wrongly sized cryptogram (9F26), ATC (9F36) or unpredictable number (9F37).
    """
    if not isinstance(text, str):
        raise CpmError("CPM payload must be text")
    text = text.strip()
    if not text:
        raise CpmError("empty CPM payload")
    if len(text) > CPM_TEXT_MAX:
        raise CpmError(f"CPM payload longer than {CPM_TEXT_MAX} characters")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CpmError(f"CPM payload is not valid base64: {exc}") from None
    try:
        tree = decode_tlv(raw)
    except TLVError as exc:
        raise CpmError(f"CPM payload is not valid BER-TLV: {exc}") from None
    if not tree or all(n.tag != _TAG_85 for n in tree):
        raise CpmError("missing payload format indicator (tag 85)")
    if tree[0].tag != _TAG_85:
        raise CpmError("payload format indicator (tag 85) must come first")
    _one(tree, _TAG_85, "payload")  # refuses a repeated 85
    if tree[0].value != b"CPV01":
        raise CpmError(f"payload format indicator is {tree[0].value!r}, expected b'CPV01'")
    for node in tree:
        if node.tag not in (_TAG_85, _TAG_61, _TAG_62):
            raise CpmError(f"unexpected tag {node.tag_hex} at the top level")
    app_nodes = [n for n in tree if n.tag == _TAG_61]
    if not app_nodes:
        raise CpmError("no application template (tag 61)")
    apps = tuple(_application(n) for n in app_nodes)
    common = _one(tree, _TAG_62, "payload")
    common_kids: tuple[Tlv, ...] = common.children if common is not None else ()

    crypto_kids: tuple[Tlv, ...] = ()
    transparent = _one(common_kids, _TAG_64, "62")
    if transparent is not None:
        crypto_kids = transparent.children
    else:
        app_specific = _one(app_nodes[0].children, _TAG_63, "61")
        if app_specific is not None:
            crypto_kids = app_specific.children
    where = "transparent template"
    cryptogram = _fixed(_one(crypto_kids, 0x9F26, where), 8, "application cryptogram (9F26)")
    atc = int.from_bytes(_fixed(_one(crypto_kids, 0x9F36, where), 2, "ATC (9F36)"), "big")
    un = _fixed(_one(crypto_kids, 0x9F37, where), 4, "unpredictable number (9F37)")
    iad_node = _one(crypto_kids, 0x9F10, where)
    if iad_node is not None and len(iad_node.value) > 32:
        raise CpmError("issuer application data (9F10) longer than 32 bytes")
    cid_node = _one(crypto_kids, 0x9F27, where)
    cid = _fixed(cid_node, 1, "CID (9F27)")[0] if cid_node is not None else None
    aip_node = _one(crypto_kids, 0x82, where)
    aip = _fixed(aip_node, 2, "AIP (82)") if aip_node is not None else None

    pan_node = _one(common_kids, 0x5A, "62")
    pan = decode_pan_bcd(pan_node.value) if pan_node is not None else next(
        (a.pan for a in apps if a.pan), None)
    if pan is None:
        raise CpmError("missing PAN (5A) in both the common data and the application templates")
    name = _ascii(_one(common_kids, 0x5F20, "62"), "cardholder name (5F20)") or next(
        (a.cardholder_name for a in apps if a.cardholder_name), None)
    psn = _psn(_one(common_kids, 0x5F34, "62")) or next((a.psn for a in apps if a.psn), None)
    return CpmPayload(
        format_indicator="CPV01", applications=apps, pan=pan, psn=psn, cardholder_name=name,
        language_preference=_ascii(_one(common_kids, 0x5F2D, "62"), "language preference (5F2D)"),
        cryptogram=cryptogram, atc=atc, unpredictable_number=un,
        iad=iad_node.value if iad_node is not None else None, cid=cid, aip=aip, tree=tuple(tree),
    )


def build_cpm_payload(*, pan: str, cryptogram: bytes, atc: int, unpredictable_number: bytes,
                      iad: bytes | None = None, psn: str | None = "00",
                      aid: bytes = PAYMENT_AID, label: str | None = "CITIZEN CARD",
                      cardholder_name: str | None = None, cid: int | None = 0x80,
                      aip: bytes | None = DEFAULT_AIP) -> str:
    """Build the base64 QR text of a CPM code: ``85 CPV01``, one ``61``, ``62``/``64`` (see module).

    ``pan`` 8..19 digits (or a payment token); ``cryptogram`` 8 bytes; ``atc`` 0..65535;
    ``unpredictable_number`` 4 bytes; ``iad`` up to 32 bytes; ``psn`` two digits; ``aid`` 5..16
    bytes; ``label`` ASCII up to 16 characters; ``cardholder_name`` ASCII 2..26 characters
    (``SURNAME/GIVEN`` pinyin); ``cid`` one byte (0x80 = ARQC); ``aip`` 2 bytes. Optional
    elements given as None are left out. Raises :class:`CpmError` for malformed input.
    """
    if not isinstance(cryptogram, bytes) or len(cryptogram) != 8:
        raise CpmError("cryptogram must be 8 bytes")
    if not isinstance(atc, int) or isinstance(atc, bool) or not 0 <= atc <= ATC_MAX:
        raise CpmError("ATC must be an int 0..65535")
    if not isinstance(unpredictable_number, bytes) or len(unpredictable_number) != 4:
        raise CpmError("unpredictable number must be 4 bytes")
    if not isinstance(aid, bytes) or not 5 <= len(aid) <= 16:
        raise CpmError("AID must be 5 to 16 bytes")
    app: list[Tlv] = [Tlv(0x4F, aid)]
    if label is not None:
        if not label.isascii() or not 1 <= len(label) <= 16:
            raise CpmError("label must be 1 to 16 ASCII characters")
        app.append(Tlv(0x50, label.encode("ascii")))
    app.append(Tlv(0x5A, encode_pan_bcd(pan)))
    if cardholder_name is not None:
        if not cardholder_name.isascii() or not 2 <= len(cardholder_name) <= 26:
            raise CpmError("cardholder name (5F20) must be 2 to 26 ASCII characters")
        app.append(Tlv(0x5F20, cardholder_name.encode("ascii")))
    if psn is not None:
        if not isinstance(psn, str) or len(psn) != 2 or not psn.isascii() or not psn.isdigit():
            raise CpmError("PSN must be two digits")
        app.append(Tlv(0x5F34, bytes.fromhex(psn)))
    data: list[Tlv] = []
    if iad is not None:
        if not isinstance(iad, bytes) or len(iad) > 32:
            raise CpmError("IAD (9F10) must be at most 32 bytes")
        data.append(Tlv(0x9F10, iad))
    data.append(Tlv(0x9F26, cryptogram))
    if cid is not None:
        if not isinstance(cid, int) or not 0 <= cid <= 0xFF:
            raise CpmError("CID must be one byte")
        data.append(Tlv(0x9F27, bytes([cid])))
    data.append(Tlv(0x9F36, atc.to_bytes(2, "big")))
    data.append(Tlv(0x9F37, unpredictable_number))
    if aip is not None:
        if not isinstance(aip, bytes) or len(aip) != 2:
            raise CpmError("AIP must be 2 bytes")
        data.append(Tlv(0x82, aip))
    tree = [
        Tlv(_TAG_85, b"CPV01"),
        Tlv(_TAG_61, children=tuple(app)),
        Tlv(_TAG_62, children=(Tlv(_TAG_64, children=tuple(data)),)),
    ]
    return base64.b64encode(encode_tlv(tree)).decode("ascii")


# --------------------------------------------------------------------------------------------
# Virtual card cryptogram (issuer-defined, see module docstring)
# --------------------------------------------------------------------------------------------

def cpm_iad(issued_at_s: int) -> bytes:
    """Our issuer application data for a CPM code: ``05 01`` + issue time (4 bytes, Unix s)."""
    if not isinstance(issued_at_s, int) or isinstance(issued_at_s, bool) or not 0 <= issued_at_s <= 0xFFFFFFFF:
        raise CpmError("issue time must be Unix seconds within 0..2^32-1")
    return CPM_IAD_FORMAT + issued_at_s.to_bytes(4, "big")


def decode_cpm_iad(iad: bytes | None) -> int:
    """Issue time (Unix seconds) from :func:`cpm_iad` bytes; :class:`CpmError` for another format."""
    if iad is None or len(iad) != 6 or iad[:2] != CPM_IAD_FORMAT:
        raise CpmError("issuer application data (9F10) is not a citizen-card CPM v1 IAD")
    return int.from_bytes(iad[2:], "big")


def cpm_transaction_data(*, issued_at_s: int, atc: int, unpredictable_number: bytes,
                         aip: bytes = DEFAULT_AIP) -> TransactionData:
    """The :class:`TransactionData` a CPM cryptogram covers (amount 0, terminal ``00000000``,
    date of issue in China Standard Time, IAD with the issue time). Raises :class:`CpmError`."""
    iad = cpm_iad(issued_at_s)
    issued = datetime.fromtimestamp(issued_at_s, CHINA_TZ).date()
    try:
        return TransactionData(
            amount_authorised_fen=0, txn_date=issued,
            unpredictable_number=unpredictable_number, atc=atc, terminal_id=CPM_TERMINAL_ID,
            currency_code=CNY_NUMERIC, country_code=CHINA_NUMERIC, aip=aip,
            iad=iad)
    except CryptogramError as exc:
        raise CpmError(f"cannot form CPM cryptogram data: {exc}") from None


def make_cpm_cryptogram(icc_mk: bytes, *, issued_at_s: int, atc: int, unpredictable_number: bytes,
                        aip: bytes = DEFAULT_AIP) -> tuple[bytes, bytes]:
    """Card (phone) side: ``(cryptogram, iad)`` for a CPM code issued at ``issued_at_s``."""
    data = cpm_transaction_data(issued_at_s=issued_at_s, atc=atc,
                                unpredictable_number=unpredictable_number, aip=aip)
    return generate_arqc(icc_mk, data), data.iad


def verify_cpm_cryptogram(issuer_mk: bytes, payload: CpmPayload, now_s: int,
                          validity_s: int = CPM_VALIDITY_S, *, last_atc: int | None = None,
                          clock_skew_s: int = CPM_CLOCK_SKEW_S,
                          atc_jump_max: int = ATC_JUMP_MAX) -> CryptogramResult:
    """Host side check of a parsed virtual-card code at time ``now_s`` (Unix seconds).

    In order: the cryptogram (``ARQC_MISMATCH`` for any tampering with PAN, PSN, ATC, UN, AIP
    or issue time); then the time window: ``CODE_EXPIRED`` when ``now_s - issued_at >
    validity_s``, ``CODE_NOT_YET_VALID`` when the issue time is more than ``clock_skew_s`` ahead;
    then :func:`card.cryptogram.check_atc` against ``last_atc`` (the highest ATC the host kept for
    this card): ``ATC_REPLAYED`` / ``ATC_JUMP_TOO_LARGE``; else ``OK``. The caller stores the ATC
    only on ``OK``. Raises :class:`CpmError` when the IAD is not ours (no issue time) or the
    PAN / PSN cannot key a card (PAN not 12..19 digits).
    """
    issued_at = decode_cpm_iad(payload.iad)
    try:
        icc_mk = derive_icc_mk(issuer_mk, payload.pan, payload.psn or "00")
    except CryptogramError as exc:
        raise CpmError(f"cannot verify CPM cryptogram: {exc}") from None
    try:
        data = cpm_transaction_data(issued_at_s=issued_at, atc=payload.atc,
                                    unpredictable_number=payload.unpredictable_number,
                                    aip=payload.aip if payload.aip is not None else DEFAULT_AIP)
    except CpmError:  # an issue time no card of ours can produce (outside 2000..2049)
        return CryptogramResult.ARQC_MISMATCH
    expected = generate_arqc(icc_mk, data)
    if not hmac.compare_digest(expected, payload.cryptogram):
        return CryptogramResult.ARQC_MISMATCH
    if now_s - issued_at > validity_s:
        return CryptogramResult.CODE_EXPIRED
    if issued_at - now_s > clock_skew_s:
        return CryptogramResult.CODE_NOT_YET_VALID
    return check_atc(last_atc, payload.atc, jump_max=atc_jump_max)
