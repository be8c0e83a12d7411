# The testbed's port-mapping gateway and STUN server (compose/docker-compose.yml,
# services r5 and stun): the wgnat image, for its router script (wgnat-router
# up upnp), plus Debian's miniupnpd (the iptables flavour: libiptc, hence the
# router's rules in iptables-legacy) and coturn (turnserver, as a STUN server:
# wgnat-stun).  Only the testbed needs them: the product image stays without.
# Built by scripts/docker-build.sh on the wgnat image.
ARG WGNAT_IMAGE=wgnat:latest
FROM ${WGNAT_IMAGE}
# policy-rc.d: the packages' post-install scripts start no daemon in the build.
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
    && apt-get update \
    && apt-get install -y --no-install-recommends miniupnpd-iptables coturn \
    && rm -f /usr/sbin/policy-rc.d \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* \
    && miniupnpd --version 2>&1 | head -1 && turnserver --version
COPY stun.sh /usr/local/bin/wgnat-stun
