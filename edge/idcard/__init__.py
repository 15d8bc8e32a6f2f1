"""The ID-card reader: GA 467 framing (``protocol``), the card's text block (``card``) and
the serial driver (``reader``). Protocol and card code are pure; only ``reader`` does I/O,
on a port its caller opened."""

from edge.idcard.card import CardData, check_digit, id_number_valid
from edge.idcard.protocol import Command, FrameDecoder, Sw3
from edge.idcard.reader import IdCardReader, ReaderGarbled, ReaderRefused

__all__ = [
    "CardData",
    "Command",
    "FrameDecoder",
    "IdCardReader",
    "ReaderGarbled",
    "ReaderRefused",
    "Sw3",
    "check_digit",
    "id_number_valid",
]
