"""Errors that haet raises on purpose.

`ConfigError` is bad input from a user (a task, model, method, parameter or file that is not
valid). The command line turns it into one line on stderr and exit code 2; the library raises it
so that callers can do the same.
"""


class ConfigError(ValueError):
    """Bad user input: the message names the bad value and the allowed ones."""


def choices_error(kind: str, value: object, allowed) -> ConfigError:
    """A ConfigError for `value` not among `allowed`, naming both."""
    allowed = sorted(allowed)
    listed = ", ".join(str(a) for a in allowed) if allowed else "(none)"
    return ConfigError(f"unknown {kind} {value!r}; choose one of: {listed}")
