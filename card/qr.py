"""QR code rendering (ISO/IEC 18004) for virtual card codes: PNG bytes and terminal text.

Error correction level M (about 15 % of codewords recoverable), a 4-module quiet zone, version
chosen to fit. Byte mode carries the text as UTF-8 (CPM payloads are base64, so plain ASCII).
"""

from __future__ import annotations

import io

import qrcode
from qrcode.constants import ERROR_CORRECT_M
from qrcode.image.pil import PilImage

__all__ = ["QR_BORDER_MODULES", "qr_matrix", "render_qr_png", "render_qr_terminal"]

#: Quiet zone around the symbol, in modules (ISO/IEC 18004 asks for 4).
QR_BORDER_MODULES = 4


def _qr(text: str) -> qrcode.QRCode:
    if not isinstance(text, str) or not text:
        raise ValueError("QR text must be a non-empty string")
    code = qrcode.QRCode(error_correction=ERROR_CORRECT_M, border=QR_BORDER_MODULES)
    code.add_data(text.encode("utf-8"))
    code.make(fit=True)  # raises qrcode.exceptions.DataOverflowError beyond version 40
    return code


def qr_matrix(text: str) -> list[list[bool]]:
    """Module matrix of the QR symbol for ``text``, quiet zone included; True = dark module."""
    return [list(row) for row in _qr(text).get_matrix()]


def render_qr_png(text: str, *, box_size: int = 8) -> bytes:
    """PNG image bytes of a QR code for ``text`` (EC level M, ``box_size`` pixels per module).

    Raises ``ValueError`` for empty text and ``qrcode.exceptions.DataOverflowError`` when the
    text does not fit a version-40 symbol.
    """
    if not isinstance(box_size, int) or box_size < 1:
        raise ValueError("box_size must be a positive int")
    code = _qr(text)
    code.box_size = box_size
    image = code.make_image(image_factory=PilImage)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def render_qr_terminal(text: str, *, invert: bool = True) -> str:
    """The QR code for ``text`` as lines of text, two modules per character cell.

    Uses the block characters ``█ ▀ ▄`` and space (one column per module, two module rows per
    line), quiet zone included, lines joined with ``\\n``. With ``invert`` (default) light modules
    are printed as blocks, which reads as a normal dark-on-light code on a dark terminal (as
    ``qrencode -t UTF8`` does); ``invert=False`` prints dark modules as blocks.
    """
    matrix = qr_matrix(text)
    if len(matrix) % 2:
        matrix.append([False] * len(matrix[0]))
    lines = []
    for top, bottom in zip(matrix[0::2], matrix[1::2]):
        chars = []
        for upper, lower in zip(top, bottom):
            upper_ink, lower_ink = (not upper, not lower) if invert else (upper, lower)
            chars.append("█" if upper_ink and lower_ink else "▀" if upper_ink
                         else "▄" if lower_ink else " ")
        lines.append("".join(chars))
    return "\n".join(lines)
