"""Text normalisation: what clean does to a text, and what the served model does to a raw text before predicting.

HTML tags removed (script and style with their content) and entities unescaped, Unicode NFKC, control and zero-width
characters removed, whitespace collapsed; lowercasing and punctuation removal only when asked.
"""

from __future__ import annotations

import html
import re
import unicodedata

# A tag starts with a letter, "/" or "!" right after "<", so "a < b" and "x<3" survive.
_TAG = re.compile(r"<[/!]?[A-Za-z][^<>]{0,2000}>|<!--.*?-->", re.DOTALL)
# Script and style elements go with their content: it is code, never part of the text.
_SCRIPT = re.compile(r"<(script|style)\b[^<>]{0,2000}>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
# Control characters become spaces (a tab or newline separates words), zero-width ones vanish.
_STRIP_TABLE = {
    **{cp: " " for cp in range(0x20)},
    0x7F: " ",
    **{cp: " " for cp in range(0x80, 0xA0)},
    **{ord(ch): None for ch in _ZERO_WIDTH},
}
_PUNCTUATION = None


def strip_html(text: str) -> str:
    """Tags removed (script and style with their content) and entities unescaped."""
    if "<" in text:
        text = _TAG.sub(" ", _SCRIPT.sub(" ", text))
    return html.unescape(text)


def normalize_text(text: str, lowercase: bool = False, remove_punctuation: bool = False) -> str:
    """The cleaned form of one text; idempotent."""
    text = strip_html(text)
    text = unicodedata.normalize("NFKC", text)
    text = text.translate(_STRIP_TABLE)
    if lowercase:
        text = text.lower()
    if remove_punctuation:
        global _PUNCTUATION
        if _PUNCTUATION is None:
            import regex  # Unicode property classes; installed with transformers

            _PUNCTUATION = regex.compile(r"\p{P}+")
        text = _PUNCTUATION.sub(" ", text)
    return " ".join(text.split())
