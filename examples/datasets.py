"""Offline real data for the examples: font identification and sklearn digits.

Nothing is downloaded. The default task is **font identification**: every font found on the machine is
a class and its samples are the 62 glyphs A–Z, a–z, 0–9, each rendered a few times with a small seeded
jitter (size, rotation, offset), at 32×32. Fonts come from

* the fonts matplotlib ships (DejaVu, STIX, Computer Modern),
* system fonts under ``/usr/share/fonts`` (Debian's ``fonts-aenigma`` adds 465 display fonts when
  installed: ``apt-get install fonts-aenigma``), and any directories passed in ``font_dirs``.

Fonts are deduplicated by (family, style) name and by identical glyph sets, and a font with fewer than
40 distinct glyphs (symbol fonts, caps-only duplicates) is dropped, so no class is trivially separable
or duplicated across the train/test split. ``--dataset digits`` uses sklearn's bundled 8×8 digits
(10 classes) for a quick check.
"""

from __future__ import annotations

import glob
import hashlib
import os
import string
from typing import List, Optional, Sequence, Tuple

import numpy as np

CHARS = string.ascii_uppercase + string.ascii_lowercase + string.digits
MIN_DISTINCT_GLYPHS = 40


def font_files(font_dirs: Sequence[str] = ()) -> List[str]:
    """TrueType/OpenType files from matplotlib, /usr/share/fonts and ``font_dirs`` (sorted, deterministic)."""
    dirs = []
    try:
        import matplotlib

        dirs.append(os.path.join(matplotlib.get_data_path(), "fonts", "ttf"))
    except ImportError:
        pass
    dirs += ["/usr/share/fonts", os.path.expanduser("~/.fonts"), *font_dirs]
    files = set()
    for d in dirs:
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
    """Font-identification data.

    Args:
        size: image side in pixels.
        renders: jittered renders per glyph (the first is unjittered).
        seed: seed of the jitter.
        max_fonts: keep at most this many fonts (after cleaning, in sorted order).
        font_dirs: extra directories to search.

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
    for path in font_files(font_dirs):
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
        raise RuntimeError("no usable fonts found; install matplotlib (pip install '.[examples]') or pass font_dirs")
    return np.stack(images), np.asarray(labels, dtype=np.int64), names


def load_digits() -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """sklearn's bundled 8×8 digits (1,797 images, 10 classes), scaled to uint8."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    return (d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64), [str(i) for i in range(10)]


def class_split(labels: np.ndarray, frac_train: float = 0.6, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Class-disjoint split: a seeded permutation of the classes, the first ``frac_train`` of them train."""
    classes = np.unique(labels)
    np.random.RandomState(seed).shuffle(classes)
    k = int(round(frac_train * len(classes)))
    train = np.isin(labels, classes[:k])
    return train, ~train
