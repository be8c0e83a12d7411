"""Console scripts: thin wrappers that run the same Options and makeService as twistd.

`wgnat-server ARGS` behaves like `twistd -n --pidfile= wgnat-server ARGS`, except
that a user mistake (a bad flag, a missing interface) prints one line, not a
usage page or a traceback, and the exit status says whether the daemon failed.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.python import usage

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _fail(program: str, message: str, code: int) -> int:
    print(f"{program}: error: {message}", file=sys.stderr)
    return code


def run_daemon(
    program: str,
    options_class: type[usage.Options],
    make_service: Callable[..., Any],
    argv: list[str],
) -> int:
    from twisted.internet import reactor

    from wgnat.logs import start_logging

    options = options_class()
    try:
        options.parseOptions(argv)
    except usage.UsageError as exc:
        return _fail(program, f"{exc} (see '{program} --help')", EXIT_USAGE)
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    start_logging(options.get("log-format", "text"))
    service = make_service(options, reactor=reactor)  # SystemExit(message) on a user mistake

    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    # SIGTERM (docker stop, systemd) and SIGINT both stop the reactor cleanly:
    # Twisted installs those handlers when the reactor runs.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reactor.run()
    return EXIT_FAILURE if getattr(service, "failed", False) else 0


def server_main(argv: list[str] | None = None) -> int:
    from wgnat.registry import tap

    return run_daemon(
        "wgnat-server", tap.Options, tap.makeService, sys.argv[1:] if argv is None else argv
    )


def client_main(argv: list[str] | None = None) -> int:
    from wgnat.client import tap

    return run_daemon(
        "wgnat-client", tap.Options, tap.makeService, sys.argv[1:] if argv is None else argv
    )
