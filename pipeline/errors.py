"""Errors the user fixes: a stage ends with exit code 2 and the message as one line, no traceback."""


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


def guarded(name: str, main, *args) -> int:
    """Run an entry point: a UserError ends it with '<name>: <message>' on stderr and exit code 2."""
    import sys

    try:
        return main(*args) or 0
    except UserError as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"{name}: {message}", file=sys.stderr)
        return 2
