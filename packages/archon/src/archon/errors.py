"""The error boundary of the `archon` command: expected failures become one line, bugs keep their traceback.

Every subcommand runs inside `run_guarded`, so a new subcommand gets the same behaviour for free:

- a user mistake (`UserError`, any `ValueError` from validation, a missing or unreadable file, a YAML or JSON
  syntax error) prints ``archon: error: <what and where, what to do>`` and exits 2;
- a runtime failure (`RunError`: a reward function that raised, too many non-finite steps, a stalled rank; a
  full disk or another OS error while writing) prints the same kind of line and exits 1;
- anything else is a bug in Archon: its traceback is printed and the exit code is 1.

``--debug`` (or ``ARCHON_DEBUG=1``) prints the traceback of every failure. ``--strict`` turns the warnings
given through `warn` into errors.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable

__all__ = ["RunError", "UserError", "describe_failure", "parse_json_line", "read_json_file", "run_guarded",
           "set_strict", "warn"]

log = logging.getLogger("archon")

EXIT_USAGE = 2
EXIT_RUNTIME = 1


class UserError(ValueError):
    """A mistake in what the user asked for (config, paths, files): exit code 2, no traceback."""


class RunError(RuntimeError):
    """An expected failure while running (a user function raised, training diverged, a rank stalled):
    exit code 1, no traceback."""


_strict = False


def set_strict(on: bool) -> None:
    """`--strict`: make every `warn` an error."""
    global _strict
    _strict = on


def warn(message: str) -> None:
    """A warning about something the user may mean; an error (`UserError`) under `--strict`."""
    if _strict:
        raise UserError(f"{message} (an error because of --strict)")
    log.warning(message)


def read_json_file(path: str | os.PathLike) -> object:
    """`json.load` of a file; a syntax error is a `UserError` naming the file, line and column."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{os.fspath(path)} line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None


def parse_json_line(path: str | os.PathLike, lineno: int, line: str) -> object:
    """One line of a JSONL file; a syntax error is a `UserError` naming the file and line (1-based)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{os.fspath(path)} line {lineno} column {e.colno}: invalid JSON: {e.msg}") from None


def _yaml_message(exc: BaseException) -> str | None:
    try:
        import yaml
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(exc, yaml.YAMLError):
        return None
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is not None:
        return f"{mark.name} line {mark.line + 1} column {mark.column + 1}: invalid YAML: {problem}"
    return f"invalid YAML: {problem}"


def describe_failure(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for an expected failure; None for a bug (show its traceback)."""
    if isinstance(exc, RunError) or getattr(exc, "archon_runtime_error", False):
        # the attribute lets modules that must import nothing of archon (the server launcher) mark run-time stops
        return str(exc), EXIT_RUNTIME
    msg = _yaml_message(exc)
    if msg is not None:
        return msg, EXIT_USAGE
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", EXIT_USAGE
    if isinstance(exc, (UnicodeDecodeError,)):
        return f"a file is not UTF-8 text: {exc}", EXIT_USAGE
    if isinstance(exc, ValueError):  # UserError, config validation, CheckpointError, grammar errors
        return str(exc), EXIT_USAGE
    if isinstance(exc, OSError):
        return _os_message(exc)
    if isinstance(exc, ImportError):  # an optional extra is not installed
        return f"{exc}; install the missing package", EXIT_USAGE
    return None


def _os_message(exc: OSError) -> tuple[str, int]:
    name = exc.filename
    what = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {name}" if name else ""
        return (f"no space left on the device{where}; the last complete checkpoint is kept, free space and "
                "resume", EXIT_RUNTIME)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        if name is None:  # an OSError raised with only a message (e.g. a missing config.json)
            return str(exc), EXIT_USAGE
        return f"{name}: {what}", EXIT_USAGE
    return (f"{name}: {what}" if name else what), EXIT_RUNTIME


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.strip().splitlines() if part.strip()) or "(no message)"


def run_guarded(fn: Callable[[], object], *, debug: bool = False) -> int:
    """Run `fn` and turn its failure into a message and an exit code (see the module doc)."""
    debug = debug or os.environ.get("ARCHON_DEBUG", "") not in ("", "0")
    try:
        fn()
    except KeyboardInterrupt:
        print("archon: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the boundary: every failure ends here
        known = describe_failure(exc)
        if debug or known is None:
            traceback.print_exc()
        if known is None:
            print(f"archon: internal error: {type(exc).__name__}: {_one_line(str(exc))} (a bug in Archon; the "
                  "traceback is above)", file=sys.stderr)
            return EXIT_RUNTIME
        message, code = known
        hint = "" if debug else " (--debug shows the traceback)" if code == EXIT_RUNTIME else ""
        print(f"archon: error: {_one_line(message)}{hint}", file=sys.stderr)
        return code
    return 0
