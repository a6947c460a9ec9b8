"""What the three command lines (export, engines.build, runtime.generate) share: a bad
argument is one line on stderr and exit 2, never argparse's usage block.

    error: --steps: invalid int value: 'x' (see python -m runtime.generate --help)
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def first_line(e: BaseException) -> str:
    """An exception's first message line, or its type when the message is empty."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def usage_error(message: str) -> int:
    """Print one `error:` line for a mistake the user can fix; the exit code (2)."""
    print(f"error: {message}", file=sys.stderr)
    return 2
