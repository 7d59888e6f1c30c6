#!/usr/bin/env bash
# Install Debian's nats-server for bench/bus.py when it is missing. The bench starts its own server on
# 127.0.0.1 and stops it; the packaged system service is not wanted, so one this install started is
# stopped and disabled again. Never fails: where nats-server cannot be installed, bench/bus.py
# skips NATS and prints why.
set -uo pipefail

say() { echo "ensure-nats: $*" >&2; }

command -v nats-server >/dev/null 2>&1 && exit 0

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        say "needs root for: $*"
        return 1
    fi
}

if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get here: install nats-server yourself, or bench/bus.py skips NATS"
    exit 0
fi
if ! as_root apt-get update -q || ! DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q nats-server; then
    say "could not install nats-server: bench/bus.py skips NATS"
    exit 0
fi
if [ -d /run/systemd/system ] && systemctl is-enabled --quiet nats-server 2>/dev/null; then
    as_root systemctl disable --now nats-server || say "could not stop the packaged nats-server service"
fi
