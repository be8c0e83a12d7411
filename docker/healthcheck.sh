#!/bin/sh
# HEALTHCHECK: healthy while `wgnat status` exits 0 (wgnat/cli/health.py).
#   1 degraded: a client without its registry for longer than its reconnect
#     backoff (30 s: a client that is reconnecting stays healthy), or device
#     operations on some of its peers failing;
#   2 down: the daemon cannot read its interface, or no daemon answers.
# Both are unhealthy; Docker reserves exit status 2, so both exit 1.  The reason
# (wgnat status prints it on stderr) is in `docker inspect`'s health log.
# Containers that run no daemon (the testbed's routers, the key generator) are
# healthy as they are.
[ -f /run/wgnat-health ] || exit 0
# shellcheck disable=SC2046 # the command line the entrypoint wrote
$(cat /run/wgnat-health) >/dev/null || exit 1
