"""The exception type of errors the user made (no imports: every package of the repository may use it)."""
from __future__ import annotations


class UserError(ValueError):
    """An error caused by the user's input: a command-line flag, a config key or value, a file or its
    content, a method or benchmark name. The command-line entry points (``utils.cli.run_cli``) report it in
    one line, ``error: <message>``, without a traceback; the message says what is wrong and how to fix it.

    Anything else (a plain ``ValueError``, ``KeyError``, ...) is a bug and keeps its traceback. A
    ``UserError`` is a ``ValueError``, so ``except ValueError`` and ``pytest.raises(ValueError)`` still catch it.
    """


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message, or its type's name (for one-line reports)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
