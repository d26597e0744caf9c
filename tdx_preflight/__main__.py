"""The console entry point (`tdx-preflight`, `python -m tdx_preflight`).

A command of this CLI lives for a fraction of a second and frees what it reads by
reference counting; the cycle collector only adds pauses while the modules load
(about 6 ms of a `check`). It is off from here on; the daemon, which lives for
months, turns it back on as it starts (daemon/service.py run_daemon).
"""

from __future__ import annotations

import gc


def main() -> None:
    """Run the CLI (tdx_preflight.cli.main) with the cycle collector off."""
    gc.disable()
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
