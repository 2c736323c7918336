"""The one helper for configuration errors: fail early, naming the field, the allowed values and the value."""
from __future__ import annotations


def require(condition: bool, field_name: str, allowed: str, value) -> None:
    """Raise ``ValueError("<field> must be <allowed>, got <value>")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{field_name} must be {allowed}, got {value!r}")
