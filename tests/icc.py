"""Real ICC profiles for the tests, written here from their published definitions (nothing is carried in the repo).

* :func:`display_p3` and :func:`adobe_rgb`: ICC v2 matrix/TRC display profiles built from the colour spaces'
  primaries and white point (Display P3: DCI-P3 primaries, D65, the sRGB curve; Adobe RGB (1998) compatible:
  its primaries, D65, gamma 563/256), adapted to the D50 connection space with the Bradford transform.
* :func:`grey_gamma`: a grey TRC profile (gamma 1.8).
* :func:`cmyk_press`: a small CMYK output profile (lut8 A2B0/B2A0, 2-point grid) of an ink model whose paper is
  not pure white and whose black is not pure black, so honouring it differs from Pillow's naive CMYK -> RGB.
"""

from __future__ import annotations

import struct

import numpy as np

D50 = np.array([0.9642, 1.0, 0.8249])
_BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(values) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(v) for v in values)


def _desc(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    return b"desc\0\0\0\0" + struct.pack(">I", len(ascii_text)) + ascii_text + b"\0" * 8 + b"\0\0\0" + b"\0" * 67


def _text(text: str) -> bytes:
    return b"text\0\0\0\0" + text.encode("ascii") + b"\0"


def _curve(table: np.ndarray | float) -> bytes:
    if isinstance(table, float):
        return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(table * 256))
    entries = np.clip(np.rint(np.asarray(table) * 65535), 0, 65535).astype(">u2")
    return b"curv\0\0\0\0" + struct.pack(">I", len(entries)) + entries.tobytes()


def _profile(device_class: bytes, space: bytes, pcs: bytes, tags: dict[bytes, bytes]) -> bytes:
    """An ICC v2.1 profile: header, tag table, tag data (each 4-byte aligned)."""
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags.items():
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body + b"\0" * (-len(body) % 4)
    size = offset + len(data)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + bytes([2, 0x10, 0, 0])
        + device_class
        + space
        + pcs
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 28
        + b"".join(_s15(v) for v in D50)
        + b"\0" * 48
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def _to_d50(primaries: list[tuple[float, float]], white: tuple[float, float]) -> np.ndarray:
    """The RGB -> XYZ (D50) matrix of a colour space given its xy primaries and white point."""

    def xyz(x: float, y: float) -> np.ndarray:
        return np.array([x / y, 1.0, (1 - x - y) / y])

    columns = np.stack([xyz(*p) for p in primaries], axis=1)
    white_xyz = xyz(*white)
    scaled = columns * np.linalg.solve(columns, white_xyz)
    cone = _BRADFORD @ white_xyz, _BRADFORD @ D50
    adapt = np.linalg.inv(_BRADFORD) @ np.diag(cone[1] / cone[0]) @ _BRADFORD
    return adapt @ scaled


def _srgb_curve() -> np.ndarray:
    v = np.linspace(0, 1, 1024)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def matrix_trc(name: str, primaries, white, curve: np.ndarray | float) -> bytes:
    matrix = _to_d50(primaries, white)
    trc = _curve(curve)
    return _profile(
        b"mntr",
        b"RGB ",
        b"XYZ ",
        {
            b"desc": _desc(name),
            b"cprt": _text("No copyright, use freely"),
            b"wtpt": _xyz(D50),
            b"rXYZ": _xyz(matrix[:, 0]),
            b"gXYZ": _xyz(matrix[:, 1]),
            b"bXYZ": _xyz(matrix[:, 2]),
            b"rTRC": trc,
            b"gTRC": trc,
            b"bTRC": trc,
        },
    )


D65 = (0.3127, 0.3290)


def display_p3() -> bytes:
    return matrix_trc("Display P3 (test)", [(0.680, 0.320), (0.265, 0.690), (0.150, 0.060)], D65, _srgb_curve())


def adobe_rgb() -> bytes:
    return matrix_trc("Adobe RGB (1998) compatible (test)", [(0.64, 0.33), (0.21, 0.71), (0.15, 0.06)], D65, 563 / 256)


def grey_gamma() -> bytes:
    return _profile(
        b"mntr", b"GRAY", b"XYZ ", {b"desc": _desc("Grey gamma 1.8 (test)"), b"wtpt": _xyz(D50), b"kTRC": _curve(1.8)}
    )


def _lab8(rgb: np.ndarray) -> list[int]:
    """sRGB (0..1) -> lut8 Lab encoding (L 0..100 -> 0..255, a/b + 128)."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = _to_d50([(0.64, 0.33), (0.30, 0.60), (0.15, 0.06)], D65) @ linear / D50
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = [116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])]
    return [round(np.clip(lab[0] * 255 / 100, 0, 255)), round(np.clip(lab[1] + 128, 0, 255)),
            round(np.clip(lab[2] + 128, 0, 255))]  # fmt: skip


def _lut8(inputs: int, outputs: int, grid: bytes) -> bytes:
    identity = bytes(range(256))
    matrix = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return b"mft1\0\0\0\0" + bytes([inputs, outputs, 2, 0]) + matrix + identity * inputs + grid + identity * outputs


def cmyk_press() -> bytes:
    paper, ink = 0.93, 0.85  # paper reflects 93 %, each full ink absorbs 85 % of its channel
    a2b = b""
    for c in (0, 1):  # grid order: first input channel varies slowest
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    rgb = paper * np.array([1 - ink * c, 1 - ink * m, 1 - ink * y]) * (1 - ink * k)
                    a2b += bytes(_lab8(rgb))
    b2a = b""
    for lightness in (0, 1):
        for _a in (0, 1):
            for _b in (0, 1):
                b2a += bytes([0, 0, 0, 255 * (1 - lightness)])
    return _profile(
        b"prtr",
        b"CMYK",
        b"Lab ",
        {
            b"desc": _desc("CMYK press (test)"),
            b"cprt": _text("No copyright, use freely"),
            b"wtpt": _xyz(D50),
            b"A2B0": _lut8(4, 3, a2b),
            b"B2A0": _lut8(3, 4, b2a),
        },
    )
