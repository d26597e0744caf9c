"""The console entry point (`tdx-preflight`, `python -m tdx_preflight`).

A command of this CLI lives for a fraction of a second and frees what it reads by
reference counting; the cycle collector only adds pauses while the modules load
(about 6 ms of a `check`). It is off from here on; the daemon, which lives for
months, turns it back on as it starts (daemon/service.py run_daemon).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from typing import NoReturn


def main() -> NoReturn:
    """Run the CLI (tdx_preflight.cli.main) with the cycle collector off, then leave()."""
    gc.disable()
    from .cli import main as cli_main

    try:
        cli_main()
    except SystemExit as exc:
        leave(exc.code)
    leave(0)


def leave(code: object) -> NoReturn:
    """End the process with `code` (a SystemExit code) as the interpreter's exit would,
    without tearing the modules down.

    The interpreter's exit (Py_FinalizeEx, Python/pylifecycle.c) waits for the other
    threads, runs the atexit callbacks, flushes stdout and stderr (exit status 120 when
    that fails), then frees every module and object. That last step decides nothing
    for a command that has finished, and cost about 4 ms of a `check` on bench/'s large
    host (median, from the command's end to the parent's wakeup). Here the atexit
    callbacks run and both streams are flushed, then os._exit ends the process.
    Whenever that could end differently, the interpreter's own exit runs instead: a
    thread besides this one is alive, `code` is not a status 0 to 255 (None counts as
    0), a flush fails (the interpreter flushes again and reports it), or -i or
    PYTHONINSPECT (sys.flags.inspect) asks for a prompt after the command.
    """
    if code is None:
        code = 0
    threading = sys.modules.get("threading")
    if (
        isinstance(code, int)
        and 0 <= code <= 255
        and (threading is None or threading.active_count() == 1)
        and not sys.flags.inspect
    ):
        atexit._run_exitfuncs()
        try:
            for stream in (sys.stdout, sys.stderr):
                if stream is not None and not stream.closed:
                    stream.flush()
        except Exception:  # the interpreter's exit below flushes again and reports it
            pass
        else:
            os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
