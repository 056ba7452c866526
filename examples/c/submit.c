/*
 * Submit messages to edge-outbox, with stable ids and retries (C99, POSIX).
 *
 *   cc -std=c99 -Wall -O2 -o edge-outbox-submit submit.c
 *   edge-outbox-submit SOCKET EXCHANGE ROUTING_KEY ID_PREFIX < payloads
 *
 * Each line of standard input is one message's payload, a JSON value, put
 * into the request as it is ({"t": 21.5}, "text", 42; EXCHANGE and
 * ROUTING_KEY must not contain " or \). Message n (from 1) gets the client
 * id ID_PREFIX-n, fixed before its first attempt and reused on every retry:
 * a message stored but not answered (a restart) is answered "ok" with
 * "duplicate":true when sent again, never stored twice.
 *
 * One connection, reopened after a failure. Retried with capped exponential
 * backoff and jitter until "ok": buffer_full, storage_full, storage_error,
 * shutting_down, a missing or refusing socket, a connection lost before the
 * answer. Not retried: bad_request, too_large (exit 65), unauthorized
 * (exit 77). Prints "ID ok" or "ID duplicate" per message; each retry is
 * one line on stderr. See docs/protocol.md of edge-outbox.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define EXIT_DATAERR 65
#define EXIT_NOPERM 77

static int fd = -1;
static char answer[65536];

static void disconnect(void) {
    if (fd >= 0)
        close(fd);
    fd = -1;
}

/* Connects if need be; 0, or -1 with errno set. */
static int ensure_connected(const char *path) {
    struct sockaddr_un addr;
    if (fd >= 0)
        return 0;
    if (strlen(path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    strcpy(addr.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int e = errno;
        disconnect();
        errno = e;
        return -1;
    }
    return 0;
}

/* Sends the request line and reads one answer line into `answer`.
 * 0 on success; -1 when the connection failed or ended first. One request
 * at a time, so nothing follows the answer on the connection. */
static int exchange_line(const char *request, size_t len) {
    size_t sent = 0, got = 0;
    while (sent < len) {
        ssize_t n = send(fd, request + sent, len - sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        sent += (size_t)n;
    }
    while (got < sizeof answer - 1) {
        ssize_t n = recv(fd, answer + got, sizeof answer - 1 - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        got += (size_t)n;
        answer[got] = '\0';
        if (strchr(answer, '\n'))
            return 0;
    }
    return -1;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static int has(const char *needle) { return strstr(answer, needle) != NULL; }

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s SOCKET EXCHANGE ROUTING_KEY ID_PREFIX < payloads\n", argv[0]);
        return 64;
    }
    const char *path = argv[1], *exchange = argv[2], *routing_key = argv[3], *prefix = argv[4];
    char *payload = NULL;
    size_t cap = 0;
    ssize_t plen;
    unsigned long n = 0;
    srand((unsigned)time(NULL) ^ (unsigned)getpid());
    while ((plen = getline(&payload, &cap, stdin)) >= 0) {
        n++;
        while (plen > 0 && (payload[plen - 1] == '\n' || payload[plen - 1] == '\r'))
            payload[--plen] = '\0';
        if (strspn(payload, " \t") == (size_t)plen)
            continue;
        char id[512];
        snprintf(id, sizeof id, "%s-%lu", prefix, n);
        size_t rlen = strlen(exchange) + strlen(routing_key) + strlen(id) + (size_t)plen + 80;
        char *request = malloc(rlen);
        if (!request) {
            perror("malloc");
            return 71;
        }
        int len = snprintf(request, rlen,
                           "{\"exchange\":\"%s\",\"routing_key\":\"%s\",\"id\":\"%s\",\"payload\":%s}\n",
                           exchange, routing_key, id, payload);
        long delay = 100;
        for (;;) {
            const char *reason;
            char why[128];
            if (ensure_connected(path) < 0) {
                snprintf(why, sizeof why, "no socket (%s)", strerror(errno));
                reason = why;
            } else if (exchange_line(request, (size_t)len) < 0) {
                disconnect();
                reason = "connection lost";
            } else if (has("\"ok\":true")) {
                printf("%s %s\n", id, has("\"duplicate\":true") ? "duplicate" : "ok");
                fflush(stdout);
                break;
            } else if (has("\"error\":\"buffer_full\"")) {
                reason = "buffer_full";
            } else if (has("\"error\":\"storage_full\"")) {
                reason = "storage_full";
            } else if (has("\"error\":\"storage_error\"")) {
                reason = "storage_error";
            } else if (has("\"error\":\"shutting_down\"")) {
                disconnect(); /* the agent closes it too; the next one reaches the next agent */
                reason = "shutting_down";
            } else {
                fprintf(stderr, "%s: refused: %s", id, answer);
                return has("\"error\":\"unauthorized\"") ? EXIT_NOPERM : EXIT_DATAERR;
            }
            fprintf(stderr, "%s: retrying: %s\n", id, reason);
            sleep_ms(delay / 2 + rand() % (delay / 2 + 1));
            delay = delay * 2 > 2000 ? 2000 : delay * 2;
        }
        free(request);
    }
    free(payload);
    disconnect();
    return 0;
}
