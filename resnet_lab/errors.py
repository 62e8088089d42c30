"""The project's user-error base class.

Every error whose message tells the user what to fix (a bad config value, a missing
data folder, a mismatched checkpoint, a diverged run) derives from `UserError`. The
`resnet-lab` entry point prints such an error as one line and exits with code 2;
`--debug` (or RESNET_LAB_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Bad input or a failed run that the user can fix; the message names the fix."""


def user_error(e: BaseException) -> UserError | None:
    """`e`, or the exception that caused it (jsonargparse and Lightning wrap errors
    raised while instantiating classes), when it is one of the project's user errors."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class DivergenceError(UserError, RuntimeError):
    """Training produced a non-finite loss or non-finite weights."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one line naming it (no usage dump), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


SEED_MAX = 2**32 - 1  # numpy's seeds, which Lightning's seed_everything enforces: one range for every command


def is_seed(v: Any) -> bool:
    """An integer from 0 to SEED_MAX: a seed that fit, sweep and ablate all take."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= SEED_MAX


def not_a_seed(v: Any) -> str:
    """The words for a value that fails `is_seed`."""
    return f"{v!r} is not a seed: give an integer from 0 to {SEED_MAX}"


def count(minimum: int):
    """An argparse type: an integer >= minimum, or one clear error."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} must be >= {minimum}")
        return v

    parse.__name__ = f"integer >= {minimum}"
    return parse


def load_yaml(path: str | os.PathLike) -> Any:
    """A YAML file's content, or one UserError naming the file, line and column."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UserError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
