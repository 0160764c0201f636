"""The one error type of the LoRA package.

``AdapterError`` subclasses ``ValueError`` so callers that only know "bad input" still catch it; the
message always names what is wrong (file, tensor key, module, expected vs got) because it is shown
verbatim to the user who uploaded the adapter.
"""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter that cannot be served on this base model, with a precise reason."""
