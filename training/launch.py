"""The life cycle every entry point shares: ranks up, the work, bad input as one line, ranks down.

Exit codes: 0 done; 2 bad input (a value, a path, a missing optional package), as argparse uses
for a bad flag; 1 a run that stopped on a non-finite loss. A traceback is kept for real bugs.
"""

import sys
from typing import Callable

from training.distributed import DistInfo, cleanup_distributed, setup_distributed
from training.trainer import NonFiniteLoss

# OSError covers a missing or unreadable data folder and an unwritable output folder; ImportError
# an optional package (torch-fidelity for FID) that is not installed.
USER_ERRORS = (ValueError, OSError, ImportError)


def launch(prog: str, device: str, work: Callable[[DistInfo], None]) -> int:
    """Run `work` on this process's rank and return the exit code (see the module docstring)."""
    try:
        work(setup_distributed(device))
        return 0
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    finally:
        cleanup_distributed()
