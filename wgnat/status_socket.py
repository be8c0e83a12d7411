"""The local status socket both daemons serve for `wgnat status`.

A tiny twisted.web resource answers every GET with the daemon's status document
(JSON, built by client/status.py or registry/status.py) on a Unix socket: local
only, the socket 0600 in a 0700 directory, so only the daemon's user (root) can
ask.  A socket left over by a daemon that died is removed at start (after
checking that nothing answers on it); the socket is removed again at stop.  A
status socket that cannot be set up is logged and skipped: the mesh matters more
than its report.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from wgnat.limits import STATUS_LIMITS, LimitedFactory
from wgnat.logs import QuietSite

log = Logger(namespace="wgnat.status")

STATUS_DIR = "/run/wgnat"

# Returns the status document, or a Deferred firing with it.
Provider = Callable[[], "dict[str, Any] | Deferred[dict[str, Any]]"]


def default_socket_path(role: str, ifname: str, directory: str | None = None) -> str:
    """`role` is "client" or "server" (the daemon's program name without "wgnat-")."""
    return os.path.join(directory or STATUS_DIR, f"{role}-{ifname}.sock")


class StatusSetupError(Exception):
    pass


class StatusResource(Resource):
    isLeaf = True

    def __init__(self, provide: Provider) -> None:
        super().__init__()
        self.provide = provide

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def failed(failure: Any) -> dict[str, Any]:
            log.failure("cannot build the status", failure)
            request.setResponseCode(500)
            return {"error": failure.getErrorMessage()}

        def send(document: dict[str, Any]) -> None:
            if gone:
                return
            request.write(json.dumps(document, sort_keys=True).encode() + b"\n")
            request.finish()

        answer: Deferred[Any] = maybeDeferred(self.provide)
        answer.addCallback(lambda document: json.loads(json.dumps(document)))  # JSON-safe
        answer.addErrback(failed).addCallback(send)
        answer.addErrback(lambda failure: log.failure("cannot send the status", failure))
        return server.NOT_DONE_YET


class StatusSite(QuietSite):
    """No access log: `wgnat status` run in a loop must not flood the daemon's log."""


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def prepare_socket_path(path: str, program: str) -> None:
    """Create the socket's directory (0700) when missing and remove a stale socket."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)  # makedirs' mode is filtered by the umask
        except OSError as exc:
            raise StatusSetupError(f"cannot create {directory}: {exc.strerror or exc}") from None
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StatusSetupError(f"{path} exists and is not a socket; remove it")
    if _answers(path):
        raise StatusSetupError(f"another {program} already answers on {path}")
    try:
        os.unlink(path)
    except OSError as exc:
        raise StatusSetupError(
            f"cannot remove the stale socket {path}: {exc.strerror or exc}"
        ) from None
    log.info("removed the stale status socket {path}", path=path)


class StatusSocket:
    """Serve `provide()` on the Unix socket at `path` from start() to stop()."""

    def __init__(self, reactor: Any, path: str, provide: Provider, program: str) -> None:
        self.reactor = reactor
        self.path = path
        self.provide = provide
        self.program = program
        self.port: Any = None
        self._inode: int | None = None

    def start(self) -> Deferred[None]:
        """Listen; never fails (a problem is logged and the socket skipped)."""
        try:
            prepare_socket_path(self.path, self.program)
        except StatusSetupError as exc:
            log.error("no status socket ('wgnat status' will not work): {error}", error=str(exc))
            return succeed(None)
        endpoint = UNIXServerEndpoint(self.reactor, self.path, mode=0o600, wantPID=False)

        def listening(port: Any) -> None:
            self.port = port
            try:
                self._inode = os.stat(self.path).st_ino
            except OSError:
                self._inode = None
            log.debug("status on {path}", path=self.path)

        def failed(failure: Any) -> None:
            log.error(
                "no status socket ('wgnat status' will not work): cannot listen on {path}: {error}",
                path=self.path,
                error=failure.getErrorMessage(),
            )

        site = LimitedFactory(
            StatusSite(StatusResource(self.provide)),
            STATUS_LIMITS,
            f"{self.program}'s status socket",
            self.reactor.seconds,
        )
        return endpoint.listen(site).addCallbacks(listening, failed)

    def stop(self) -> Deferred[None]:
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        stopped = maybeDeferred(port.stopListening)

        def remove(result: Any) -> Any:
            # Twisted unlinks the socket itself; make sure, but only ours.
            try:
                if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass
            return result

        return stopped.addBoth(remove)
