#!/usr/bin/env bash
# Install (if needed) and start a local Docker engine for the docker-runtime tests, then make sure the
# tiny test image (tests/docker_image.py) is imported.  Idempotent: a second call finds it running.
#
#   scripts/docker-engine.sh [start]   install + start + image (default)
#   scripts/docker-engine.sh stop      stop the engine this script started
#   scripts/docker-engine.sh status    exit 0 if the engine answers
#
# The engine runs with the vfs storage driver (works on any filesystem, inside VMs and containers),
# without iptables rules and without the default bridge: containers get no network unless a test
# builds one, so nothing they do can leave the machine.  Needs root.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG="${BONJOURGRID_DOCKERD_LOG:-/var/log/bonjourgrid-dockerd.log}"
PIDFILE="${BONJOURGRID_DOCKERD_PIDFILE:-/var/run/bonjourgrid-dockerd.pid}"
WAIT_S="${BONJOURGRID_DOCKERD_WAIT_S:-90}"
PYTHON="${PYTHON:-python3}"
DOCKERD=/usr/sbin/dockerd

engine_up() { docker info >/dev/null 2>&1; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "docker-engine.sh: must run as root to install and start dockerd" >&2
        exit 2
    fi
}

install_packages() {
    local missing=()
    [ -x "$DOCKERD" ] || missing+=(docker.io)
    [ -x /bin/busybox ] && file -b /bin/busybox 2>/dev/null | grep -q 'statically linked' || missing+=(busybox-static)
    command -v file >/dev/null || missing+=(file)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing ${missing[*]} ..."
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # docker.io's own client goes to /usr/bin/docker; a newer client earlier on PATH negotiates the API down.
        apt-get install -y -qq -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
    fi
    command -v docker >/dev/null || { echo "no docker client after install" >&2; exit 1; }
}

start_engine() {
    if engine_up; then
        echo "docker engine already running"
        return
    fi
    echo "starting dockerd (log: $LOG)"
    # setsid + nohup: the engine outlives this script and the test session that called it.
    setsid nohup "$DOCKERD" --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none \
        --pidfile "$PIDFILE" >>"$LOG" 2>&1 </dev/null &
    local waited=0
    until engine_up; do
        if [ "$waited" -ge "$WAIT_S" ]; then
            echo "dockerd did not answer within ${WAIT_S}s; last log lines:" >&2
            tail -n 30 "$LOG" >&2 || true
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    echo "docker engine up after ~${waited}s"
}

stop_engine() {
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        local pid
        pid="$(cat "$PIDFILE")"
        kill "$pid"
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        echo "dockerd ($pid) stopped"
    else
        echo "no dockerd started by this script is running"
    fi
}

case "${1:-start}" in
    start)
        need_root
        install_packages
        start_engine
        image="$(cd "$HERE" && "$PYTHON" tests/docker_image.py)"
        echo "test image: $image"
        echo "stop it with: $0 stop   (or: kill \$(cat $PIDFILE))"
        ;;
    stop) need_root; stop_engine ;;
    status) engine_up ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
