"""Offline real data for the examples: font identification on pinned fonts, and sklearn digits.

Nothing is downloaded and nothing is picked up from the machine. The default task is **font
identification** on a fixed, versioned font set, :data:`FONT_SET`: the 24 fonts that matplotlib 3.11.2
ships inside its wheel (``matplotlib/mpl-data/fonts/ttf``) and that draw at least 40 distinct glyphs of
A–Z, a–z, 0–9 (DejaVu Sans / Sans Mono / Serif in 4 styles each, STIX General in 4 styles, 8 Computer
Modern fonts; the STIX size/non-Unicode fonts, the two "Display" fonts and LastResort draw no letters or
the same box for every one). Every font is a class; its samples are the 62 glyphs, each rendered
``renders`` times (the first plain, the others with a small seeded jitter of size, rotation and offset),
at 32×32. Extra font directories (``font_dirs``, e.g. Debian's ``fonts-aenigma``) are used only when asked
for, and then the dataset is no longer the pinned one.

:func:`fingerprint` hashes the rendered arrays and labels, so two machines can check that they trained
on the same pixels (the glyph rasteriser is Pillow's FreeType, so the pixels depend on the Pillow and
matplotlib versions; both are pinned in the ``examples`` extra). ``--dataset digits`` uses sklearn's
bundled 8×8 digits (10 classes) for a quick check.
"""

from __future__ import annotations

import glob
import hashlib
import os
import string
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

CHARS = string.ascii_uppercase + string.ascii_lowercase + string.digits
MIN_DISTINCT_GLYPHS = 40

#: Version of the default font set; bump it whenever :data:`FONT_SET` or the rendering changes.
FONT_SET_VERSION = "matplotlib-3.11.2-bundled-v1"
#: The matplotlib release whose bundled fonts :data:`FONT_SET` lists (pinned in the ``examples`` extra).
FONT_SET_MATPLOTLIB = "3.11.2"
#: The default font set, file names under ``matplotlib.get_data_path()/fonts/ttf``, in class order.
FONT_SET = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmmi10.ttf", "cmsy10.ttf", "cmex10.ttf",
)


def bundled_font_files() -> List[str]:
    """Paths of :data:`FONT_SET` inside the installed matplotlib (raises if matplotlib or a file is missing)."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the fonts dataset needs matplotlib's bundled fonts: pip install '.[examples]'") from err
    root = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    paths = [os.path.join(root, name) for name in FONT_SET]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"matplotlib {matplotlib.__version__} lacks fonts of FONT_SET "
                                f"({FONT_SET_VERSION}): {missing}")
    return paths


def extra_font_files(font_dirs: Sequence[str]) -> List[str]:
    """TrueType/OpenType files under ``font_dirs`` (recursive, sorted)."""
    files = set()
    for d in font_dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"font_dirs: {d!r} is not a directory")
        for ext in ("ttf", "otf", "TTF", "OTF"):
            files.update(glob.glob(os.path.join(d, "**", f"*.{ext}"), recursive=True))
    return sorted(files)


def _render(font, ch: str, size: int, angle: float, shift: Tuple[int, int]):
    """One glyph: tight box, rotated, centred on a square with a small offset, resized to size×size."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(ch)
    if right - left <= 0 or bottom - top <= 0:
        return None
    im = Image.new("L", (right - left + 8, bottom - top + 8), 0)
    ImageDraw.Draw(im).text((4 - left, 4 - top), ch, font=font, fill=255)
    if angle:
        im = im.rotate(angle, resample=Image.BILINEAR, expand=True)
    side = max(im.size) + 4
    square = Image.new("L", (side, side), 0)
    square.paste(im, ((side - im.width) // 2 + shift[0], (side - im.height) // 2 + shift[1]))
    return np.asarray(square.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_fonts(size: int = 32, renders: int = 3, seed: int = 0, max_fonts: Optional[int] = None,
               font_dirs: Sequence[str] = ()) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Font-identification data on :data:`FONT_SET` (plus the fonts under ``font_dirs``, if given).

    Fonts are deduplicated by (family, style) name and by identical glyph sets, and a font with fewer than
    40 distinct glyphs is dropped (all of :data:`FONT_SET` passes), so no class is duplicated across the
    train/test split.

    Args:
        size: image side in pixels (default 32).
        renders: renders per glyph, the first unjittered (default 3).
        seed: seed of the jitter (default 0).
        max_fonts: keep at most this many fonts, in order (default all).
        font_dirs: extra directories to search (default none: the pinned set only).

    Returns:
        ``(images, labels, names)``: uint8 (N, size, size), int64 (N,) font ids, and the font names.
    """
    try:
        from PIL import ImageFont
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the fonts dataset needs Pillow (installed with matplotlib: "
                          "pip install '.[examples]')") from err
    rng = np.random.RandomState(seed)
    seen_names, seen_glyphs = set(), set()
    images, labels, names = [], [], []
    for path in bundled_font_files() + extra_font_files(font_dirs):
        try:
            font = ImageFont.truetype(path, 40)
        except OSError:
            continue
        name = " ".join(font.getname())
        if name in seen_names:
            continue
        base = [_render(font, ch, size, 0.0, (0, 0)) for ch in CHARS]
        base = [g for g in base if g is not None and g.max() > 0]
        digests = {hashlib.md5(g.tobytes()).hexdigest() for g in base}
        glyph_set = hashlib.md5("".join(sorted(digests)).encode()).hexdigest()
        if len(digests) < MIN_DISTINCT_GLYPHS or glyph_set in seen_glyphs:
            continue
        seen_names.add(name)
        seen_glyphs.add(glyph_set)
        cls = len(names)
        names.append(name)
        for ch in CHARS:
            for r in range(renders):
                if r == 0:
                    glyph = _render(font, ch, size, 0.0, (0, 0))
                else:
                    jittered = ImageFont.truetype(path, int(rng.randint(32, 49)))
                    glyph = _render(jittered, ch, size, float(rng.uniform(-8, 8)),
                                    (int(rng.randint(-2, 3)), int(rng.randint(-2, 3))))
                if glyph is not None and glyph.max() > 0:
                    images.append(glyph)
                    labels.append(cls)
        if max_fonts is not None and len(names) >= max_fonts:
            break
    if not names:
        raise RuntimeError("no usable fonts found")
    return np.stack(images), np.asarray(labels, dtype=np.int64), names


def load_digits() -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """sklearn's bundled 8×8 digits (1,797 images, 10 classes), scaled to uint8."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    return (d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64), [str(i) for i in range(10)]


def fingerprint(images: np.ndarray, labels: np.ndarray) -> Dict[str, object]:
    """What identifies a dataset: sha256 of the uint8 images and int64 labels (C order), class and image counts.

    Args:
        images: uint8 (N, H, W).
        labels: int (N,).
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    h = hashlib.sha256()
    h.update(repr(images.shape).encode())
    h.update(images.tobytes())
    h.update(labels.tobytes())
    return {"sha256": h.hexdigest(), "classes": int(len(np.unique(labels))), "images": int(len(labels))}


def versions() -> Dict[str, str]:
    """Versions of the libraries that decide the pixels and the training (torch, numpy, Pillow, matplotlib)."""
    import sys

    out = {"python": sys.version.split()[0]}
    for module, key in (("torch", "torch"), ("numpy", "numpy"), ("PIL", "Pillow"), ("matplotlib", "matplotlib")):
        try:
            out[key] = __import__(module).__version__
        except ImportError:
            out[key] = "not installed"
    return out


def class_split(labels: np.ndarray, frac_train: float = 0.6, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Class-disjoint split: a seeded permutation of the classes, the first ``frac_train`` of them train."""
    classes = np.unique(labels)
    np.random.RandomState(seed).shuffle(classes)
    k = int(round(frac_train * len(classes)))
    train = np.isin(labels, classes[:k])
    return train, ~train
