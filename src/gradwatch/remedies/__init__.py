"""Fixes for gradient pathologies, built on torch's own primitives.

``catalogue`` says what each fix is (an id, a sentence, a snippet); ``apply`` changes a
model in place for the fixes that can be applied mechanically.
"""

from .apply import APPLICABLE, apply_remedies
from .catalogue import REMEDIES, remedy

__all__ = ["APPLICABLE", "REMEDIES", "apply_remedies", "remedy"]
