// Submit messages to edge-outbox, with stable ids and retries (Go, standard
// library only).
//
//	go build -o edge-outbox-submit submit.go
//	edge-outbox-submit SOCKET EXCHANGE ROUTING_KEY ID_PREFIX < payloads
//
// Each line of standard input is one message's payload, a JSON value
// ({"t": 21.5}, "text", 42), sent as it is. Message n (from 1) gets the
// client id ID_PREFIX-n, fixed before its first attempt and reused on every
// retry: a message stored but not answered (a restart) is answered "ok" with
// "duplicate": true when sent again, never stored twice.
//
// One connection, reopened after a failure. Retried with capped exponential
// backoff and jitter until "ok": buffer_full, storage_full, storage_error,
// shutting_down, a missing or refusing socket, a connection lost before the
// answer. Not retried: bad_request, too_large (exit 65), unauthorized (exit
// 77). Prints "ID ok" or "ID duplicate" per message; each retry is one line
// on stderr. See docs/protocol.md of edge-outbox.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"net"
	"os"
	"strings"
	"syscall"
	"time"
)

const (
	exitDataErr  = 65
	exitNoPerm   = 77
	backoffFirst = 100 * time.Millisecond
	backoffCap   = 2 * time.Second
)

// The refusals worth another try: the agent is busy, full or restarting.
var retryable = map[string]bool{
	"buffer_full": true, "storage_full": true, "storage_error": true, "shutting_down": true,
}

type request struct {
	Exchange   string          `json:"exchange"`
	RoutingKey string          `json:"routing_key"`
	ID         string          `json:"id"`
	Payload    json.RawMessage `json:"payload"`
}

type answer struct {
	OK        bool   `json:"ok"`
	Duplicate bool   `json:"duplicate"`
	Error     string `json:"error"`
	Message   string `json:"message"`
}

// conn is one connection to the agent, opened lazily, dropped on failure.
type conn struct {
	path   string
	c      net.Conn
	reader *bufio.Reader
}

// errNoSocket: the agent is not running (no socket, or nobody listening).
var errNoSocket = errors.New("no socket")

func (k *conn) request(line []byte) (answer, error) {
	var a answer
	if k.c == nil {
		c, err := net.Dial("unix", k.path)
		if err != nil {
			if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
				return a, fmt.Errorf("%w (%v)", errNoSocket, err)
			}
			return a, err
		}
		k.c, k.reader = c, bufio.NewReaderSize(c, 64*1024)
	}
	if _, err := k.c.Write(append(line, '\n')); err != nil {
		k.close()
		return a, err
	}
	reply, err := k.reader.ReadBytes('\n')
	if err != nil {
		k.close()
		return a, fmt.Errorf("the agent closed the connection before answering: %w", err)
	}
	if err := json.Unmarshal(reply, &a); err != nil {
		k.close()
		return a, fmt.Errorf("unreadable answer: %w", err)
	}
	return a, nil
}

func (k *conn) close() {
	if k.c != nil {
		k.c.Close()
	}
	k.c, k.reader = nil, nil
}

// submit sends one message until it is stored and returns the answer.
func submit(k *conn, req request) answer {
	line, err := json.Marshal(req)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", req.ID, err)
		os.Exit(exitDataErr)
	}
	delay := backoffFirst
	for {
		var reason string
		a, err := k.request(line)
		switch {
		case errors.Is(err, errNoSocket):
			reason = err.Error()
		case err != nil:
			reason = "connection lost (" + err.Error() + ")"
		case a.OK:
			return a
		case !retryable[a.Error]:
			fmt.Fprintf(os.Stderr, "%s: refused %s: %s\n", req.ID, a.Error, a.Message)
			if a.Error == "unauthorized" {
				os.Exit(exitNoPerm)
			}
			os.Exit(exitDataErr)
		default:
			reason = a.Error
			if a.Error == "shutting_down" {
				k.close() // the agent closes it too; the next one reaches the next agent
			}
		}
		fmt.Fprintf(os.Stderr, "%s: retrying: %s\n", req.ID, reason)
		time.Sleep(time.Duration(float64(delay) * (0.5 + rand.Float64()/2)))
		if delay *= 2; delay > backoffCap {
			delay = backoffCap
		}
	}
}

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: edge-outbox-submit SOCKET EXCHANGE ROUTING_KEY ID_PREFIX < payloads")
		os.Exit(2)
	}
	path, exchange, routingKey, prefix := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	k := &conn{path: path}
	defer k.close()
	input := bufio.NewScanner(os.Stdin)
	input.Buffer(make([]byte, 64*1024), 16*1024*1024)
	for n := 1; input.Scan(); n++ {
		text := strings.TrimSpace(input.Text())
		if text == "" {
			continue
		}
		if !json.Valid([]byte(text)) {
			fmt.Fprintf(os.Stderr, "line %d is not a JSON value\n", n)
			os.Exit(exitDataErr)
		}
		id := fmt.Sprintf("%s-%d", prefix, n)
		a := submit(k, request{exchange, routingKey, id, json.RawMessage(text)})
		if a.Duplicate {
			fmt.Println(id, "duplicate")
		} else {
			fmt.Println(id, "ok")
		}
	}
	if err := input.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "reading standard input:", err)
		os.Exit(1)
	}
}
