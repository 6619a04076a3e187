#!/usr/bin/env bash
# Run Mosquitto for a BonjourGrid CE bus on loopback, in the foreground, with TCP_NODELAY.
#
#   scripts/mosquitto.sh [PORT] [HOST]            anonymous (loopback experiments only)
#   BG_MQTT_USER=u BG_MQTT_PASS=p scripts/mosquitto.sh 1883
#
# Why a script: Mosquitto must be told `set_tcp_nodelay true`, otherwise a QoS 1
# request/response waits on delayed ACKs (88 ms instead of 0.35 ms). The config and
# password file live in a temp dir removed on exit. Python code should rather call
# bonjourgrid.broker.start_mosquitto(), which writes the same config.
set -euo pipefail
PORT="${1:-1883}"
HOST="${2:-127.0.0.1}"
command -v mosquitto >/dev/null || PATH="$PATH:/usr/sbin"
command -v mosquitto >/dev/null || { echo "mosquitto is not installed: apt-get install -y mosquitto" >&2; exit 1; }
DIR="$(mktemp -d -t bg-mosquitto-XXXXXX)"
trap 'rm -rf "$DIR"' EXIT
{
  echo "listener $PORT $HOST"
  echo "set_tcp_nodelay true"
  echo "persistence false"
  echo "max_queued_messages 100000"
  echo "log_dest stderr"
  if [ -n "${BG_MQTT_USER:-}" ]; then
    mosquitto_passwd -c -b "$DIR/passwd" "$BG_MQTT_USER" "${BG_MQTT_PASS:-}"
    echo "allow_anonymous false"
    echo "password_file $DIR/passwd"
  else
    echo "allow_anonymous true"
  fi
  [ "$(id -u)" = 0 ] && echo "user root"  # else mosquitto drops to user 'mosquitto', which cannot read $DIR
} >"$DIR/mosquitto.conf"
echo "mosquitto on mqtt://$HOST:$PORT (config $DIR/mosquitto.conf)" >&2
mosquitto -c "$DIR/mosquitto.conf" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT INT TERM
wait $PID
