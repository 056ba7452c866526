#!/bin/sh
# Submit messages to edge-outbox with socat, with stable ids and retries.
#
#   submit.sh SOCKET EXCHANGE ROUTING_KEY ID_PREFIX < payloads
#
# Each line of standard input is one message's payload, a JSON value, put
# into the request as it is ({"t": 21.5}, "text", 42; EXCHANGE and
# ROUTING_KEY must not contain " or \). Message n (from 1) gets the client
# id ID_PREFIX-n, fixed before its first attempt and reused on every retry:
# a message stored but not answered (a restart) is answered "ok" with
# "duplicate":true when sent again, never stored twice.
#
# One connection per message. Retried with capped exponential backoff until
# "ok": buffer_full, storage_full, storage_error, shutting_down, a missing
# or refusing socket, no answer. Not retried: bad_request, too_large
# (exit 65), unauthorized (exit 77). Prints "ID ok" or "ID duplicate" per
# message; each retry is one line on stderr. Needs socat.
set -u
[ $# -eq 4 ] || { echo "usage: $0 SOCKET EXCHANGE ROUTING_KEY ID_PREFIX < payloads" >&2; exit 64; }
socket=$1 exchange=$2 routing_key=$3 prefix=$4

n=0
while IFS= read -r payload || [ -n "$payload" ]; do
  n=$((n + 1))
  [ -n "$(printf '%s' "$payload" | tr -d ' \t\r')" ] || continue
  id="$prefix-$n"
  request=$(printf '{"exchange":"%s","routing_key":"%s","id":"%s","payload":%s}' \
    "$exchange" "$routing_key" "$id" "$payload")
  delay_ms=100
  while :; do
    # -t 30: after sending, wait up to 30 s for the answer (the agent closes
    # the connection right after it).
    answer=$(printf '%s\n' "$request" | socat -t 30 - "UNIX-CONNECT:$socket" 2>/dev/null | head -n 1)
    case $answer in
      *'"ok":true'*'"duplicate":true'*) echo "$id duplicate"; break ;;
      *'"ok":true'*) echo "$id ok"; break ;;
      *'"error":"buffer_full"'*) reason=buffer_full ;;
      *'"error":"storage_full"'*) reason=storage_full ;;
      *'"error":"storage_error"'*) reason=storage_error ;;
      *'"error":"shutting_down"'*) reason=shutting_down ;;
      *'"error":"unauthorized"'*) echo "$id: refused: $answer" >&2; exit 77 ;;
      *'"error":'*) echo "$id: refused: $answer" >&2; exit 65 ;;
      '')
        if [ -S "$socket" ]; then reason="no answer (connection refused or lost)"; else reason="no socket"; fi ;;
      *) echo "$id: unexpected answer: $answer" >&2; exit 70 ;;
    esac
    echo "$id: retrying: $reason" >&2
    # Jitter: 50-100 % of the delay.
    sleep_ms=$(( delay_ms / 2 + $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % (delay_ms / 2 + 1) ))
    sleep "$(printf '%d.%03d' $((sleep_ms / 1000)) $((sleep_ms % 1000)))"
    delay_ms=$(( delay_ms * 2 )); [ "$delay_ms" -le 2000 ] || delay_ms=2000
  done
done
