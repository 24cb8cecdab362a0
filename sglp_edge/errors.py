"""Re-export of the project-wide user-error type (see ``exporters/errors.py``)."""

from exporters.errors import UserError

__all__ = ["UserError"]
