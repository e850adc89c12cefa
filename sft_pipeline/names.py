"""Names built from users' label strings for other systems: MLflow metric and param keys, file names.

A label is any string (`refund?`, `a/b`, `card payment`, `积极`) and stays exactly that in the data, the reports,
the model's config and its answers. Only where another system restricts names is a safe form used: letters of any
script, digits, `_`, `.` and `-` are kept; any other character becomes `_`, and a name that had to change gets 6 hex
digits of the label's hash, so that `a/b` and `a_b` (or `a?` and `a!`) never share a key. The same label always gives
the same safe name, on every machine; evaluate's report lists every label with its MLflow key.
"""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^\w.\-]")
# MLflow keys are at most 250 characters; room is left for prefixes such as `test_precision_`.
MAX_PART = 180


def safe_name(label: str) -> str:
    """`label` itself when it is safe as an MLflow key part and a file name, else a safe form with its hash."""
    safe = _UNSAFE.sub("_", label)
    if safe == label and safe not in ("", ".", "..") and len(safe) <= MAX_PART:
        return label
    tag = hashlib.blake2b(label.encode("utf-8", "surrogatepass"), digest_size=3).hexdigest()
    return f"{safe[:MAX_PART].strip('.') or 'label'}-{tag}"
