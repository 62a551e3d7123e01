"""Errors that are the user's to fix: the backend raises them instead of falling back to eager.

Everything else that goes wrong while compiling a graph falls back (see the README's contract);
these name a mistake in what was asked for (a calibration of another model, an option that cannot
apply), where running eagerly would silently ignore the request.
"""


class UserError(ValueError):
    """A request the backend cannot honour as given; the message says what to change."""


__all__ = ["UserError"]
