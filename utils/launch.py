"""The life cycle every entry point shares (training, sampling, evaluation): ranks up, the work,
bad input as one line, ranks down.

Exit codes: 0 done; 2 bad input (a value, a path, a missing optional package), as argparse uses
for a bad flag; 1 a run that stopped itself (a non-finite loss, a stop checkpoint it could not write). A traceback is kept for real bugs,
including a ValueError raised inside a library (scipy, numpy, torch) or by Python itself in the
repo's code (an unpacking, an int() of a bad string): only the repo's own checks, `raise
ValueError(...)` statements, raise ValueErrors written for the user.
"""

import dis
import os
import sys
from typing import Callable

from utils.distributed import DistInfo, cleanup_distributed, setup_distributed

# OSError covers a missing or unreadable data folder and an unwritable output folder; ImportError
# an optional package (torch-fidelity for FID) that is not installed.
USER_ERRORS = (ValueError, OSError, ImportError)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunFailed(RuntimeError):
    """A run that stopped itself for a reason the user must read (exit 1), e.g. a non-finite loss."""


def is_user_error(err: BaseException) -> bool:
    """A USER_ERRORS exception meant for the user: any OSError or ImportError; a ValueError only
    when the innermost Python frame that raised it is a `raise` statement in this repo's code (not
    an installed package's, nor a built-in operation's on a line of ours)."""
    if not isinstance(err, ValueError):
        return True
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    code = tb.tb_frame.f_code
    where = os.path.abspath(code.co_filename)
    ours = where.startswith(REPO + os.sep) and "site-packages" not in where
    # The instruction that raised, read from the bytecode (the source may have changed since).
    return ours and dis.opname[code.co_code[tb.tb_lasti]] == "RAISE_VARARGS"


def launch(prog: str, device: str, work: Callable[[DistInfo], None]) -> int:
    """Run `work` on this process's rank and return the exit code (see the module docstring)."""
    try:
        work(setup_distributed(device))
        return 0
    except USER_ERRORS as err:
        if not is_user_error(err):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    finally:
        cleanup_distributed()
