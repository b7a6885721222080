"""How a command ends when something goes wrong: the user's fault is one `error:` line and exit 2, an
interruption one `stopped:` line, and only our own bugs show a traceback.

User errors are recognised by class, not by message: each stage raises its own subclass of UserError
(ConfigError, DataError, CheckpointError, EvalError, ScheduleError). This module imports none of those
stages (a Ctrl+C while torch loads is handled here too, and `report` / `gate` never load torch). An OSError from a path the user gave (permission
denied, a folder where a file belongs, no space left) is the user's too: it names the path and what to do.
Everything printed passes through redact(): no URL credentials, even inside an exception's text.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from .redact import redact

EXIT_USER_ERROR = 2
EXIT_SIGINT = 130


class UserError(Exception):
    """The base of every "the input is wrong" error: each stage subclasses it (ConfigError, DataError,
    CheckpointError, EvalError, ScheduleError) and its message says what, where and what to do."""


# errno -> what the user can do about it
OS_ERROR_HINTS = {
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EISDIR: "it is a folder: give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.ENOSPC: "free some space or choose another disk",
    errno.EDQUOT: "your disk quota is used up: free some space or choose another disk",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.EEXIST: "something is already there: move it away or choose another path",
}
_NEED_NO_PATH = (errno.ENOSPC, errno.EDQUOT)  # a write to an open file fails without naming it


def is_user_error(error: BaseException) -> bool:
    """Is `error` one of finetrack's "the input is wrong" types (or an OSError about a path the user gave)?"""
    if isinstance(error, UserError):
        return True
    return isinstance(error, OSError) and error.errno in OS_ERROR_HINTS and (error.filename is not None or error.errno in _NEED_NO_PATH)


def describe(error: BaseException) -> str:
    """The one line a user error is shown as (without the `error: ` prefix)."""
    if isinstance(error, OSError) and not isinstance(error, UserError):
        return _describe_os_error(error)
    return one_line(str(error)) or type(error).__name__


def one_line(text: str) -> str:
    """A message of several lines as one: a line that ends in ':' introduces the next, the others are joined by '; '
    ("2 problems in the config:\n  a.yaml:2: ...\n  a.yaml:3: ..." -> "2 problems in the config: a.yaml:2: ...; a.yaml:3: ...")."""
    out = ""
    for line in (" ".join(line.split()) for line in text.splitlines()):
        if line:
            out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def _describe_os_error(error: OSError) -> str:
    path = error.filename
    what = error.strerror or str(error)
    hint = OS_ERROR_HINTS[error.errno]
    if error.errno in _NEED_NO_PATH:
        where = Path(path) if path else Path.cwd()
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            free = shutil.disk_usage(where).free
            hint += f" ({free / 2**20:,.0f} MiB free on the disk of {where})"
        except OSError:
            pass
    target = f"{path}: " if path else ""
    if error.filename2 is not None:
        target = f"{path} -> {error.filename2}: "
    return f"{target}{what}; {hint}"


def handle(command: Callable[[], int], argv: Sequence[str] = ()) -> int:
    """Run `command`, turning user errors and interruptions into one line on stderr and an exit status."""
    try:
        return command()
    except KeyboardInterrupt:
        # Ctrl+C before the run's own handlers are installed (e.g. while torch or transformers load)
        _say("stopped: interrupted (Ctrl+C); nothing was written that the same command does not redo")
        return EXIT_SIGINT
    except SystemExit:
        raise
    except BrokenPipeError:
        # the reader of our output went away (`finetrack train --help-config | head`): nothing to say, and Python
        # must not complain again when it flushes stdout at exit (https://docs.python.org/3/library/signal.html#note-on-sigpipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except BaseException as e:
        interrupted = sys.modules.get("finetrack.interrupt")
        if interrupted is not None and isinstance(e, interrupted.Interrupted):
            _say(f"stopped: {e}")
            return e.exit_code
        if not isinstance(e, Exception):
            raise
        if is_user_error(e):
            _say(f"error: {describe(e)}")
            return EXIT_USER_ERROR
        # our bug: the whole traceback, as Python prints it, but without URL credentials
        sys.stderr.write(redact("".join(traceback.format_exception(e))))
        sys.stderr.write(f"finetrack {' '.join(argv[:1])}: internal error (a bug in finetrack, not in your input); please report it\n")
        return 1


def _say(line: str) -> None:
    sys.stderr.write(redact(line) + "\n")
    sys.stderr.flush()
