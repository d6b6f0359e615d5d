"""The project's error base, and pydantic's validation errors as messages naming field and rule."""

from __future__ import annotations

from pydantic import ValidationError


class PostbackRelayError(Exception):
    """Base of every error this project defines: a caller can catch ours apart from a library's.

    Errors that are also a built-in kind keep that base too (``InvalidEvent`` is a
    ``ValueError``), so code that catches the built-in one keeps working."""


def describe_validation_error(exc: ValidationError, drop_loc: frozenset[str] = frozenset()) -> str:
    """One part per problem: ``field.path: rule (got value)``; never echoes long values.

    ``drop_loc`` names location parts that are noise to the reader (a union's tag, say).
    Errors raised by a model validator already start with the field they concern.
    """
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"] if str(part) not in drop_loc)
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        got = ""
        shown_input = err.get("input")
        if err["type"] not in {"missing", "extra_forbidden"} and not isinstance(
            shown_input, dict | list
        ):
            shown = repr(shown_input)
            got = f" (got {shown[:60]}{'...' if len(shown) > 60 else ''})"
        lines.append(f"{loc}: {msg}{got}" if loc else f"{msg}{got}")
    return "; ".join(lines)


class InvalidEvent(PostbackRelayError, ValueError):
    """An event failed validation; ``str()`` names every field and rule that failed."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]

    @classmethod
    def from_validation_error(cls, exc: ValidationError) -> InvalidEvent:
        problems = describe_validation_error(exc).split("; ")
        return cls("invalid event: " + "; ".join(problems), problems)
