/* Fixed-rate (open-loop) HTTP/1.1 load, for latency at a set fraction of a target's maximum.
 *
 * wrk is closed-loop and Debian has no wrk2, so this sends requests on a fixed schedule whatever the server
 * does, and times each from when it was *due*, not when it was sent: a stalled server shows up as latency
 * instead of as fewer requests (no coordinated omission). A request due while every connection is busy waits
 * in a backlog, and that wait counts. Written in C because the Python client it replaces was itself the
 * bottleneck above ~4,000 req/s (p99 4 ms against nginx at 5,000 req/s; this one: see bench/README.md).
 *
 *   openloop PORT RATE SECONDS TOKENS [CONNECTIONS]    -> one JSON line on stdout
 *
 * Built by bench/openloop.py (cc -O2); one thread, epoll, non-blocking keep-alive connections.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define DRAIN_SECONDS 10.0
#define BUF_SIZE 65536

typedef struct {
    int fd;
    int open;        /* connected (or connecting) */
    int connected;   /* connect() finished */
    long inflight;   /* index of the request awaiting its answer, -1 when idle */
    size_t used;
    char buf[BUF_SIZE];
} conn_t;

static int port, nconn, epfd;
static double rate, start;
static conn_t *conns;
static char **requests;
static size_t *request_len;
static long nrequests, total, sent, completed, non_2xx, errors_count, connect_failures;
static double *latencies;
static long *backlog; /* ring of request indices */
static long backlog_head, backlog_count;
static int *idle; /* stack of idle connection slots */
static int nidle;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double due_of(long i) { return start + i / rate; }

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void conn_open(int slot);

static void send_request(int slot, long i) {
    conn_t *c = &conns[slot];
    size_t len = request_len[i % nrequests];
    ssize_t n = send(c->fd, requests[i % nrequests], len, MSG_NOSIGNAL);
    c->inflight = i;
    if (n != (ssize_t)len) { /* an idle keep-alive socket takes a small request whole; anything else is a loss */
        errors_count++;
        c->inflight = -1;
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->open = c->connected = 0;
        conn_open(slot);
    }
}

static void make_ready(int slot) {
    if (backlog_count > 0) {
        long i = backlog[backlog_head];
        backlog_head = (backlog_head + 1) % total;
        backlog_count--;
        send_request(slot, i);
    } else {
        idle[nidle++] = slot;
    }
}

static void conn_open(int slot) {
    conn_t *c = &conns[slot];
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c->open = 1;
    c->connected = 0;
    c->inflight = -1;
    c->used = 0;
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        close(c->fd); /* e.g. no ephemeral port left: the slot stays closed; main() opens it again */
        c->open = 0;
        connect_failures++;
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.u32 = (unsigned)slot};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
}

static void conn_lost(int slot) {
    conn_t *c = &conns[slot];
    for (int k = 0; k < nidle; k++) {
        if (idle[k] == slot) {
            idle[k] = idle[--nidle];
            break;
        }
    }
    if (c->inflight >= 0) errors_count++;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->open = c->connected = 0;
    c->inflight = -1;
    if (sent < total || backlog_count > 0) conn_open(slot);
}

/* Whether [from, to) holds `word`, in any case (the buffer is not NUL-terminated: no strcasestr). */
static int has_word(const char *from, const char *to, const char *word) {
    size_t n = strlen(word);
    for (const char *p = from; p + n <= to; p++)
        if (!strncasecmp(p, word, n)) return 1;
    return 0;
}

/* The unsigned number (base 10 or 16) that [from, to) holds after optional spaces, up to the first non-digit;
 * -1 when there is no digit or it overflows. Bounded: the buffer is not NUL-terminated. */
static long parse_number(const char *from, const char *to, int base) {
    while (from < to && (*from == ' ' || *from == '\t')) from++;
    long value = 0;
    const char *start = from;
    for (; from < to; from++) {
        int digit = *from >= '0' && *from <= '9'   ? *from - '0'
                    : base == 16 && *from >= 'a' && *from <= 'f' ? *from - 'a' + 10
                    : base == 16 && *from >= 'A' && *from <= 'F' ? *from - 'A' + 10
                                                                  : -1;
        if (digit < 0) break;
        if (value > (BUF_SIZE * 16L)) return -1; /* larger than any answer this client takes */
        value = value * base + digit;
    }
    return from == start ? -1 : value;
}

/* Bytes of the first complete response in buf, its status and whether the connection stays open; 0 while
 * incomplete, -1 when it cannot be parsed. Content-Length and chunked bodies. */
static long response_size(const char *buf, size_t used, int *status, int *keep_alive) {
    const char *end = memmem(buf, used, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = (size_t)(end - buf) + 4;
    *status = head >= 16 ? (int)parse_number(buf + 9, buf + 12, 10) : -1; /* "HTTP/1.1 200" */
    if (*status < 0) return -1;
    *keep_alive = 1;
    long length = 0;
    int chunked = 0;
    for (const char *line = memchr(buf, '\n', head) + 1; line < buf + head - 2;) {
        const char *next = memchr(line, '\n', (size_t)(buf + head - line));
        if (!next) break;
        if (!strncasecmp(line, "content-length:", 15) && (length = parse_number(line + 15, next, 10)) < 0) return -1;
        if (!strncasecmp(line, "transfer-encoding:", 18) && has_word(line, next, "chunked")) chunked = 1;
        if (!strncasecmp(line, "connection:", 11) && has_word(line, next, "close")) *keep_alive = 0;
        line = next + 1;
    }
    if (!chunked) return used >= head + (size_t)length ? (long)(head + (size_t)length) : 0;
    size_t pos = head;
    for (;;) {
        const char *eol = memmem(buf + pos, used - pos, "\r\n", 2);
        if (!eol) return 0;
        long size = parse_number(buf + pos, eol, 16);
        if (size < 0) return -1;
        pos = (size_t)(eol - buf) + 2 + (size_t)size + 2;
        if (pos > used) return 0;
        if (size == 0) return (long)pos;
    }
}

static void on_readable(int slot) {
    conn_t *c = &conns[slot];
    int eof = 0;
    while (c->used < BUF_SIZE) {
        ssize_t n = recv(c->fd, c->buf + c->used, BUF_SIZE - c->used, 0);
        if (n == 0) {
            eof = 1; /* an answer may have come with the close: counted below, then the connection goes */
            break;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            conn_lost(slot);
            return;
        }
        c->used += (size_t)n;
    }
    if (c->used == 0) {
        if (eof) conn_lost(slot);
        return;
    }
    if (c->inflight < 0) { /* an answer to no request (e.g. a 408 before the next one): not ours to count */
        conn_lost(slot);
        return;
    }
    int status, keep_alive;
    long size = response_size(c->buf, c->used, &status, &keep_alive);
    if (size < 0 || (size == 0 && (eof || c->used == BUF_SIZE))) { /* unparsable, cut short, or too large */
        conn_lost(slot);
        return;
    }
    if (size == 0) return;
    latencies[completed++] = now() - due_of(c->inflight);
    non_2xx += status < 200 || status >= 300;
    c->inflight = -1;
    memmove(c->buf, c->buf + size, c->used - (size_t)size);
    c->used -= (size_t)size;
    if (keep_alive && !eof)
        make_ready(slot);
    else
        conn_lost(slot);
}

static void on_event(struct epoll_event *ev) {
    int slot = (int)ev->data.u32;
    conn_t *c = &conns[slot];
    if (!c->open) return;
    if (!c->connected && (ev->events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            conn_lost(slot);
            return;
        }
        c->connected = 1;
        struct epoll_event in = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (unsigned)slot};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &in);
        make_ready(slot);
    }
    if (ev->events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) on_readable(slot);
}

static void wait_events(double until) {
    struct epoll_event events[256];
    double left = until - now();
    struct timespec ts = {0, 0};
    if (left > 0) {
        ts.tv_sec = (time_t)left;
        ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
    }
    int n = epoll_pwait2(epfd, events, 256, &ts, NULL);
    if (n < 0 && errno != EINTR) die("epoll_pwait2");
    for (int k = 0; k < n; k++) on_event(&events[k]);
}

static void load_requests(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) die(path);
    long cap = total < 1 ? 1 : total;
    requests = calloc((size_t)cap, sizeof *requests);
    request_len = calloc((size_t)cap, sizeof *request_len);
    char *line = NULL;
    size_t size = 0;
    ssize_t n;
    while (nrequests < cap && (n = getline(&line, &size, f)) > 0) {
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' ')) line[--n] = 0;
        if (n == 0) continue;
        int len = asprintf(&requests[nrequests],
                           "GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n\r\n", port, line);
        if (len < 0) die("asprintf");
        request_len[nrequests++] = (size_t)len;
    }
    free(line);
    fclose(f);
    if (nrequests == 0) {
        fprintf(stderr, "openloop: no tokens in %s\n", path);
        exit(2);
    }
}

/* Slots whose connect() failed at once stay closed until here, so a failure cannot spin in a loop. */
static void reopen_closed(void) {
    for (int k = 0; k < nconn; k++)
        if (!conns[k].open) conn_open(k);
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double p) {
    if (completed == 0) return 0.0;
    long k = (long)(p / 100.0 * (double)completed);
    return latencies[k < completed ? k : completed - 1] * 1000.0;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: openloop PORT RATE SECONDS TOKENS [CONNECTIONS]\n");
        return 2;
    }
    port = atoi(argv[1]);
    rate = atof(argv[2]);
    double seconds = atof(argv[3]);
    nconn = argc > 5 ? atoi(argv[5]) : 64;
    total = (long)(rate * seconds);
    if (port <= 0 || rate <= 0 || total <= 0 || nconn <= 0) {
        fprintf(stderr, "openloop: PORT, RATE, SECONDS and CONNECTIONS must be positive\n");
        return 2;
    }
    load_requests(argv[4]);
    latencies = calloc((size_t)total, sizeof *latencies);
    backlog = calloc((size_t)total, sizeof *backlog);
    conns = calloc((size_t)nconn, sizeof *conns);
    idle = calloc((size_t)nconn, sizeof *idle);
    if (!latencies || !backlog || !conns || !idle) die("calloc");
    epfd = epoll_create1(0);
    if (epfd < 0) die("epoll_create1");
    for (int k = 0; k < nconn; k++) conn_open(k);
    double opened = now() + 0.2; /* connections open before the clock starts */
    while (now() < opened) wait_events(opened);
    start = now();
    while (sent < total) {
        reopen_closed();
        double due = due_of(sent);
        if (now() < due) {
            wait_events(due);
            continue;
        }
        for (double t = now(); sent < total && due_of(sent) <= t; sent++) {
            if (nidle > 0) {
                send_request(idle[--nidle], sent);
            } else {
                backlog[(backlog_head + backlog_count) % total] = sent;
                backlog_count++;
            }
        }
    }
    /* Bounded: whatever has not come back DRAIN_SECONDS after the last send counts as lost. */
    double deadline = now() + DRAIN_SECONDS;
    while (completed + errors_count < total && now() < deadline) {
        reopen_closed();
        wait_events(deadline);
    }
    double elapsed = now() - start;
    qsort(latencies, (size_t)completed, sizeof *latencies, by_value);
    printf("{\"rate\": %.1f, \"sent\": %ld, \"completed\": %ld, \"achieved_rps\": %.1f, \"p50_ms\": %.3f, "
           "\"p90_ms\": %.3f, \"p99_ms\": %.3f, \"p999_ms\": %.3f, \"max_ms\": %.3f, \"non_2xx\": %ld, "
           "\"errors\": %ld, \"connect_failures\": %ld}\n",
           rate, total, completed, completed / elapsed, pct(50), pct(90), pct(99), pct(99.9),
           completed ? latencies[completed - 1] * 1000.0 : 0.0, non_2xx, total - completed, connect_failures);
    return 0;
}
