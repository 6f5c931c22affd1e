"""The life cycle every entry point shares (training, sampling, evaluation): ranks up, the work,
bad input as one line, ranks down.

Exit codes: 0 done; 2 bad input (a value, a path, a missing optional package), as argparse uses
for a bad flag; 1 a run that stopped itself (a non-finite loss, a stop checkpoint it could not
write); 130 a Ctrl-C outside the training loop (which turns one into a stop checkpoint instead),
e.g. while generating or scoring, which run_main turns into an end by SIGINT (the shell shows 130).
A traceback is kept for real bugs, including a ValueError raised inside a library (scipy, numpy,
torch) or by Python itself in the repo's code (an unpacking, an int() of a bad string): only the
repo's own checks, `raise ValueError(...)` statements, raise ValueErrors written for the user. An exception from a DataLoader
worker (an image refused or unreadable) is judged and printed as the worker raised it.
"""

import dis
import json
import os
import re
import signal
import sys
import time
from typing import Callable, NoReturn, Optional, Tuple

from utils.distributed import DistInfo, cleanup_distributed, setup_distributed

# OSError covers a missing or unreadable data folder and an unwritable output folder; ImportError
# an optional package (torch-fidelity for FID) that is not installed.
USER_ERRORS = (ValueError, OSError, ImportError)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunFailed(RuntimeError):
    """A run that stopped itself for a reason the user must read (exit 1), e.g. a non-finite loss."""


def user_message(err: BaseException) -> Optional[str]:
    """What to print for a USER_ERRORS exception meant for the user, None for a bug: any OSError or
    ImportError; a ValueError only when the innermost Python frame that raised it is a `raise`
    statement in this repo's code (not an installed package's, nor a built-in operation's on a line
    of ours). An exception from a DataLoader worker (a refused or corrupt image) is judged, and
    reported, by the worker's traceback, not by torch's re-raise in this process."""
    worker = worker_traceback(str(err))
    if worker is not None:
        where, source, message = worker
        return message if not isinstance(err, ValueError) or (ours(where) and source.startswith("raise")) else None
    if not isinstance(err, ValueError):
        return str(err)
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return None
    code = tb.tb_frame.f_code
    # The instruction that raised, read from the bytecode (the source may have changed since).
    raised = dis.opname[code.co_code[tb.tb_lasti]] == "RAISE_VARARGS"
    return str(err) if ours(code.co_filename) and raised else None


def ours(filename: str) -> bool:
    where = os.path.abspath(filename)
    return where.startswith(REPO + os.sep) and "site-packages" not in where


# torch re-raises an exception from a DataLoader worker in the main process as its type, with the
# worker's formatted traceback as the message.
WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback \(most recent call last\):\n")
FRAME = re.compile(r'^  File "(.*)", line \d+, in .*\n', re.M)


def worker_traceback(text: str) -> Optional[Tuple[str, str, str]]:
    """(file, first source line, message) of the innermost frame of a worker's traceback that torch
    re-raised as `text`, or None when `text` is not one."""
    if not WORKER_ERROR.match(text):
        return None
    frames = list(FRAME.finditer(text))
    if not frames:
        return None
    rest = text[frames[-1].end():].split("\n")
    source = [line.strip() for line in rest if line.startswith("    ")]   # the code, then ^^^ markers
    error = "\n".join(line for line in rest if not line.startswith("    ")).strip()
    name, _, message = error.partition(": ")   # "ValueError: ...", "PIL.UnidentifiedImageError: ..."
    return frames[-1].group(1), source[0] if source else "", message or name


def report(line: str, code: int) -> int:
    """Print `line` for the user and return `code`. Under torchrun, also hand it to the agent's
    error file: its closing summary then names this line as the root cause instead of "To enable
    traceback see ...", below the other ranks' tracebacks of their broken collectives."""
    print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                # The agent names the failure with the earliest whole-second timestamp the root cause,
                # and stamps a rank without an error file (one that failed in a collective because
                # of this one) when it sees it, often within the same second: one second earlier
                # wins that tie.
                json.dump({"message": line, "timestamp": int(time.time()) - 1}, f)
        except OSError:   # the summary only loses the line; it is printed above
            pass
    return code


def run_main(main: Callable[[], Optional[int]]) -> NoReturn:
    """A script's `if __name__ == "__main__"`: run main() and end the process with its exit code.
    A Ctrl-C (130 = 128 + SIGINT: launch's interrupted line or the trainer's stop checkpoint) ends
    it by SIGINT itself, as an uncaught KeyboardInterrupt does: a shell loop or script running it
    stops too, where a plain exit 130 would let it go on to its next command (bash's
    wait-and-cooperative-exit)."""
    try:
        code = main()
    except SystemExit as stop:   # the trainer's stop exit, argparse's
        code = stop.code
    end_process(code)


def end_process(code: Optional[int]) -> NoReturn:
    """sys.exit(code), except that 130 (128 + SIGINT) ends the process by SIGINT (see run_main)."""
    if code == 128 + signal.SIGINT and os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(code)


def launch(prog: str, device: str, work: Callable[[DistInfo], None]) -> int:
    """Run `work` on this process's rank and return the exit code (see the module docstring)."""
    try:
        work(setup_distributed(device))
        return 0
    except USER_ERRORS as err:
        message = user_message(err)
        if message is None:
            raise
        return report(f"{prog}: error: {message}", 2)
    except RunFailed as err:
        return report(f"{prog}: error: {err}", 1)
    except KeyboardInterrupt:   # the user knows where they pressed it: no traceback
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup_distributed()
