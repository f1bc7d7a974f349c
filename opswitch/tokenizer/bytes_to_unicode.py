"""The GPT-2 byte <-> printable-character table.

Byte-level BPE works on bytes, but its vocabulary files store tokens as
text.  GPT-2 therefore maps every byte to a visible Unicode character
(printable Latin-1 bytes map to themselves, the other 68 bytes to the
characters from U+0100 on), so that vocab.json never contains spaces or
control characters.  The table must match GPT-2's exactly or ids differ.
"""

from __future__ import annotations


def _build_table() -> tuple[str, ...]:
    """Return the character for each byte value 0..255, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


#: BYTE_TO_UNICODE[b] is the vocabulary character that stands for byte b.
BYTE_TO_UNICODE: tuple[str, ...] = _build_table()

#: Inverse of BYTE_TO_UNICODE: vocabulary character -> byte value.
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_UNICODE)}

#: str.translate table turning a latin-1 decoded byte string into vocab chars.
LATIN1_TO_VOCAB: dict[int, str] = dict(enumerate(BYTE_TO_UNICODE))
