"""Matplotlib figures that show every label as it is, in any script.

Matplotlib's default font, DejaVu Sans, covers Latin, Greek and Cyrillic but no Chinese, Japanese or Korean: a
confusion matrix of 积极/消极/中性 drew empty boxes. Noto Sans CJK SC (SIL Open Font Licence), installed by the
Makefile from the `mplfonts` package (only its font file is used), is added as a fallback family, so each character
is drawn by the first font that has it. A label with characters no installed font has is still written as it is,
and the characters are named in a warning: a label is never dropped or replaced.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

FALLBACK_FONTS = [("mplfonts", "fonts/NotoSansCJKsc-Regular.otf")]
FIRST = "DejaVu Sans"  # matplotlib's own, always there


def fallback_font_files() -> list[Path]:
    found = []
    for package, relative in FALLBACK_FONTS:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            path = Path(spec.submodule_search_locations[0]) / relative
            if path.is_file():
                found.append(path)
    return found


def pyplot():
    """matplotlib.pyplot, headless, with the fallback fonts after the default one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    families = []
    for path in fallback_font_files():
        font_manager.fontManager.addfont(str(path))
        families.append(font_manager.FontProperties(fname=str(path)).get_name())
    # Fallback goes through font.family's list of family names (a generic "sans-serif" resolves to one font only).
    matplotlib.rcParams["font.family"] = [FIRST, *[f for f in families if f != FIRST]]
    return plt


def missing_glyphs(texts: list[str]) -> dict[str, str]:
    """text -> its characters that no font of the figure's family list can draw (empty when all are covered)."""
    import matplotlib
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    fonts = []
    for name in matplotlib.rcParams["font.family"]:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)
        except ValueError:
            continue
        fonts.append(FT2Font(path).get_charmap())
    out = {}
    for text in texts:
        missing = "".join(sorted({c for c in text if not c.isspace() and not any(ord(c) in m for m in fonts)}))
        if missing:
            out[text] = missing
    return out
