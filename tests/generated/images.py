"""Image files built to test the decoders: headers that claim a huge size, EXIF rotation, CMYK, 16 bits."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims ``width`` x ``height`` RGB pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG with its frame header (SOF0) rewritten to claim ``width`` x ``height``."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), (90, 120, 30)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """20 x 10 stored pixels, white left half, EXIF orientation 6: upright it is 10 wide, 20 tall, white on top."""
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", exif=exif.tobytes(), quality=95)


def sixteen_bit_png(fmt: str = "PNG") -> bytes:
    ramp = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257  # 0 .. 65535 in steps of one 8-bit level
    return encoded(Image.fromarray(ramp), fmt)
