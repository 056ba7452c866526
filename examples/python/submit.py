#!/usr/bin/env python3
"""Submit messages to edge-outbox, with stable ids and retries (stdlib only).

    submit.py SOCKET EXCHANGE ROUTING_KEY ID_PREFIX < payloads

Each line of standard input is one message's payload, a JSON value
(`{"t": 21.5}`, `"text"`, `42`). Message n (from 1) gets the client id
ID_PREFIX-n, fixed before its first attempt and reused on every retry, so
a message the agent stored but could not answer (a restart) is answered
`ok` with `"duplicate": true` when sent again, never stored twice. Running
the same input again is safe for the same reason.

Retried, with capped exponential backoff and jitter, until `ok`:
`buffer_full`, `storage_full`, `storage_error`, `shutting_down` answers,
a missing or refusing socket (the agent is not running or restarting) and
a connection lost before the answer. Not retried: `bad_request`,
`too_large` (exit 65) and `unauthorized` (exit 77): resending cannot help.

Prints `ID ok` (or `ID duplicate`) per message on stdout; each retry is
one line on stderr. See docs/protocol.md of edge-outbox.
"""

import json
import random
import socket
import sys
import time

RETRY = {"buffer_full", "storage_full", "storage_error", "shutting_down"}
EXIT_DATAERR, EXIT_NOPERM = 65, 77
BACKOFF_FIRST, BACKOFF_CAP = 0.1, 2.0


class NoSocket(OSError):
    """The agent's socket is missing or refuses connections."""


class Connection:
    """One connection to the agent; reconnects lazily after a failure."""

    def __init__(self, path):
        self.path = path
        self.sock = None
        self.reader = None

    def request(self, line):
        """Sends one request line; returns the answer (a dict), or raises OSError."""
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError as e:
                sock.close()
                raise NoSocket(e.errno, e.strerror) from e
            self.sock, self.reader = sock, sock.makefile("rb")
        try:
            self.sock.sendall(line.encode() + b"\n")
            answer = self.reader.readline()
        except OSError:
            self.close()
            raise
        if not answer:
            self.close()
            raise ConnectionError("the agent closed the connection before answering")
        return json.loads(answer)

    def close(self):
        if self.sock is not None:
            self.reader.close()
            self.sock.close()
        self.sock = self.reader = None


def submit(conn, exchange, routing_key, msg_id, payload):
    """Submits one message until it is stored; returns the answer."""
    request = json.dumps(
        {"exchange": exchange, "routing_key": routing_key, "id": msg_id, "payload": payload}
    )
    delay = BACKOFF_FIRST
    while True:
        try:
            answer = conn.request(request)
        except NoSocket as e:
            reason = f"no socket ({e.strerror})"
        except OSError as e:
            reason = f"connection lost ({e})"
        else:
            if answer.get("ok"):
                return answer
            code = answer.get("error")
            if code not in RETRY:
                print(f"{msg_id}: refused {code}: {answer.get('message')}", file=sys.stderr)
                sys.exit(EXIT_NOPERM if code == "unauthorized" else EXIT_DATAERR)
            reason = code
            if code == "shutting_down":
                conn.close()  # the agent closes it too; the next one reaches the next agent
        print(f"{msg_id}: retrying: {reason}", file=sys.stderr, flush=True)
        time.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, BACKOFF_CAP)


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    path, exchange, routing_key, prefix = sys.argv[1:]
    conn = Connection(path)
    for n, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        msg_id = f"{prefix}-{n}"
        answer = submit(conn, exchange, routing_key, msg_id, json.loads(line))
        print(msg_id, "duplicate" if answer.get("duplicate") else "ok", flush=True)
    conn.close()


if __name__ == "__main__":
    main()
