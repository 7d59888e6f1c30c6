#!/usr/bin/env bash
# Make sure what the host and its tests need is installed (the Debian packages below) and that a local
# Docker engine answers: start dockerd without a bridge when no daemon answers, and wait for it. Packages are
# checked whatever the engine's state. Safe to run any number of times; installs and starts only what is
# missing.
#
# Environment: BAAAHT_DOCKER_WAIT (seconds to wait for the daemon, default 60),
#              BAAAHT_DOCKERD_LOG (dockerd's log file, default /var/log/baaaht-dockerd.log).
set -euo pipefail

WAIT_SECONDS=${BAAAHT_DOCKER_WAIT:-60}
PIDFILE=/var/run/docker.pid
# --bridge=none: containers get loopback only, which is all baaaht ever gives them.
DOCKERD_ARGS=(--bridge=none --iptables=false --ip-forward=false --ip-masq=false)
# Debian packages needed, one per line: "package [command]". With a command, the package counts as present
# when that command is on PATH (an engine installed another way, e.g. docker-ce, is fine).
NEEDED_PACKAGES=(
    "docker.io dockerd"
    "debootstrap"     # the agent and orchestrator images' Debian base (host/debian_base.py)
    "busybox-static"  # the test images are built from its static /bin/busybox
)

say() { echo "ensure-docker: $*" >&2; }
die() { say "$*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@" || die "needs root for: $* (sudo -n refused)"
    else
        die "needs root for: $*"
    fi
}

engine_answers() {
    command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1
}

package_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

install_missing_packages() {
    local missing=() entry package command
    for entry in "${NEEDED_PACKAGES[@]}"; do
        read -r package command <<<"$entry"
        if [ -n "$command" ]; then
            command -v "$command" >/dev/null 2>&1 && continue
        fi
        package_installed "$package" || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]}, and there is no apt-get to install them"
    say "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

# A dockerd that is alive but not answering yet is left alone (we only wait for it); a pid file naming a
# dead process would make a new dockerd refuse to start, so it is removed.
dockerd_alive_from_pidfile() {
    [ -f "$PIDFILE" ] || return 1
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    if [ -n "$pid" ] && [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "dockerd" ]; then
        return 0
    fi
    say "removing stale $PIDFILE (pid '${pid}' is not a running dockerd)"
    as_root rm -f "$PIDFILE"
    return 1
}

pick_log_file() {
    local wanted=${BAAAHT_DOCKERD_LOG:-/var/log/baaaht-dockerd.log}
    if ( : >>"$wanted" ) 2>/dev/null; then
        echo "$wanted"
    else
        mktemp -t baaaht-dockerd.XXXXXX.log
    fi
}

start_dockerd() {
    local log
    log=$(pick_log_file)
    say "starting dockerd ${DOCKERD_ARGS[*]} (log: $log)"
    # setsid + nohup: the daemon outlives this script and the shell that ran it.
    as_root setsid nohup dockerd "${DOCKERD_ARGS[@]}" >>"$log" 2>&1 </dev/null &
    DOCKERD_LOG=$log
}

wait_for_engine() {
    local deadline=$((SECONDS + WAIT_SECONDS))
    until engine_answers; do
        if [ $SECONDS -ge $deadline ]; then
            say "the Docker engine did not answer within ${WAIT_SECONDS}s"
            [ -n "${DOCKERD_LOG:-}" ] && tail -n 20 "$DOCKERD_LOG" >&2
            exit 1
        fi
        sleep 0.5
    done
}

main() {
    install_missing_packages
    engine_answers && exit 0
    if ! dockerd_alive_from_pidfile; then
        start_dockerd
    fi
    wait_for_engine
    say "engine ready: $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"
}

main "$@"
