"""Text normalisation applied to every sentence as it is read.

The same sentence must give the same words and the same teacher features whichever file it
came from, so composed/decomposed accents, stray byte-order marks and odd whitespace
(non-breaking spaces, tabs inside a JSON value, runs of spaces) are made uniform here, once.
"""

from __future__ import annotations

import re
import unicodedata

# Python's \s on str matches every Unicode whitespace character (NBSP, U+2028, U+3000, ...).
_WHITESPACE = re.compile(r"\s+")
# C0 controls except TAB, LF, CR; DEL; C1 controls. These never belong in a sentence and usually
# mean a binary or mis-decoded file.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def normalize_text(s: str) -> str:
    """NFC, no U+FEFF anywhere, every run of whitespace collapsed to one space, stripped."""
    s = s.replace("\ufeff", "")
    s = unicodedata.normalize("NFC", s)
    return _WHITESPACE.sub(" ", s).strip()


def has_control_chars(s: str) -> bool:
    """True when ``s`` holds a C0/C1 control character other than tab, newline, CR, or DEL."""
    return _CONTROL.search(s) is not None
