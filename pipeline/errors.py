"""Errors the user fixes: a stage ends with exit code 2 and the message as one line, no traceback.
So does an OSError that is the machine's, not the code's: a full disk or no permission, naming the path."""
import errno
import os

# OSErrors that are the disk's (full, over quota, a file larger than it or a size limit allows): every later
# write would fail alike
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_PERMISSION = (errno.EACCES, errno.EPERM)


class UserError(Exception):
    """Bad params, a missing upstream output, unusable data or arguments; the message says what to do."""


class ParamError(UserError):
    """A params.yaml value (or a command-line argument) that is unknown, mistyped or out of range."""


class MissingInput(UserError):
    """An upstream output that does not exist yet."""


def require(path, written_by: str) -> None:
    """Fail with one line naming the stage to run when an input file or folder is missing."""
    from pathlib import Path

    if not Path(path).exists():
        raise MissingInput(f"{path} does not exist: run the `{written_by}` stage first "
                           f"(`dvc repro {written_by}`, or `dvc repro` for the whole pipeline)")


def os_error_line(err: OSError) -> str | None:
    """One line for a full disk or a denied permission, naming the path that filled (and how much room its
    filesystem has left) or that was refused; None for any other OSError (a bug to see in full)."""
    path = err.filename
    if err.errno in DISK_FULL:
        return f"{err.strerror} writing {path or '(no path given)'}{_room(path)}: make room there and re-run"
    if err.errno in NO_PERMISSION and path:
        return f"{err.strerror}: {path}: check its owner and permissions"
    return None


def _room(path) -> str:
    """' (N MB free on the filesystem holding FOLDER)' for the nearest existing folder of path, or ''."""
    from pathlib import Path

    folder = Path(path).parent if path else None
    while folder is not None and not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        stat = os.statvfs(folder)
    except (OSError, TypeError):
        return ""
    return f" ({stat.f_bavail * stat.f_frsize / 1e6:.1f} MB free on the filesystem holding {folder})"


def guarded(name: str, main, *args) -> int:
    """Run an entry point: a UserError, a full disk or a denied permission ends it with '<name>: <message>' on
    stderr and exit code 2."""
    import sys

    try:
        return main(*args) or 0
    except UserError as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
    except OSError as err:
        message = os_error_line(err)
        if message is None:
            raise
    print(f"{name}: {message}", file=sys.stderr)
    return 2
