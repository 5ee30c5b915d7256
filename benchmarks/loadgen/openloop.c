/*
 * openloop: an open-loop HTTP/1.1 load generator (Linux, libc only).
 *
 *   openloop HOST PORT RATE DURATION_S CONNECTIONS TIMEOUT_S PATHS_FILE SAMPLES_FILE SEED
 *
 * Why C: the asyncio generator in benchmarks/serving_load.py costs ~0.5 ms of CPU per request,
 * so on a 2-core machine it cannot offer much more than 1,000 requests/s and it takes CPU from
 * the server it measures. This program keeps the same semantics at a few microseconds per
 * request: one thread, nonblocking sockets, edge-triggered epoll, no busy waiting.
 *
 * Semantics (the same as `_load` in benchmarks/serving_load.py):
 *   - request i is scheduled at start + i / RATE, start = now + 0.2 s, for
 *     i < floor(RATE * DURATION_S); its path is drawn from PATHS_FILE (one per line) by a PRNG
 *     seeded with SEED, in request order, so a seed always gives the same sequence;
 *   - at most CONNECTIONS requests are in flight; a due request waits in FIFO order for a free
 *     slot, and its latency runs from its *scheduled* time to the end of its response, so
 *     queueing in the generator shows in the latency (no coordinated omission);
 *   - `GET path HTTP/1.1` with `Host:` and `Connection: keep-alive`; the connection is reused
 *     unless the response says `Connection: close` (or is HTTP/1.0 without keep-alive);
 *   - a request without a complete response TIMEOUT_S after it was handed to a connection is a
 *     client timeout (its connection is closed); refused / reset / EOF / unparsable is an error.
 *     A reused keep-alive connection that the server had already closed (EOF or reset before a
 *     single byte of the response) is reopened once for the same request, as HTTP clients do.
 *
 * SAMPLES_FILE (TSV) starts with one comment line
 *   # started_at_monotonic=<s> elapsed_s=<s> requests=<n> rate=<r> generator=c-openloop
 * (CLOCK_MONOTONIC, the clock of Python's time.monotonic() on Linux; elapsed runs from start to
 * the end of the last request), then one line per request in scheduled order:
 *   offset_s latency_ms status source degraded degrade_reason model_version retry_after
 * status is the HTTP code, `timeout` or `error`; `-` stands for a missing value. The body fields
 * come from a substring scan of a JSON object body (first occurrence of each key).
 *
 * Exit status: 0 done, 1 runtime failure (out of memory, cannot write), 2 bad arguments.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h> /* isfinite, INFINITY: macros, no libm */
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define LEAD_S 0.2              /* start = now + LEAD_S, as in _load */
#define MAX_HEAD (64 * 1024)    /* a longer response head is an error */
#define MAX_RESPONSE (64 << 20) /* a longer response is an error */
#define FIELD_MAX 200           /* longest string value kept per field */

enum { K_PENDING = 0, K_RESPONSE, K_TIMEOUT, K_ERROR };
enum { S_FREE = 0, S_SENDING, S_READING };
enum { B_LENGTH, B_CHUNKED, B_EOF };

typedef struct {
    uint32_t off; /* the line's tail (after offset_s) in the arena */
    uint32_t len;
    uint8_t kind;
} sample_t;

typedef struct {
    int fd;          /* -1: no connection */
    uint32_t events; /* epoll interest; 0: not in the epoll set yet */
    uint32_t gen;    /* bumped per connection, so stale epoll events are ignored */
    int state;
    int req;         /* request index, -1 when free */
    int path;
    int reused;      /* this request went out on a kept-alive connection */
    double deadline;
    size_t sent;
    char *buf;
    size_t len, cap;
    /* response parse state */
    size_t head_len; /* 0 until the head is complete */
    int status, close, body_mode;
    size_t clen;     /* B_LENGTH: body length */
    size_t cpos;     /* B_CHUNKED: parse cursor */
    char retry[64];
} slot_t;

static struct {
    double start, rate, timeout;
    int total, conns, npaths;
    char **req; /* prebuilt request per path */
    size_t *reqlen;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int family, epfd;
    slot_t *slots;
    int *freestack, nfree;
    sample_t *samples;
    char *arena;
    size_t alen, acap;
    int done;
    uint64_t rng;
} G;

static void die(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("openloop: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double sched(int i) { return G.start + (double)i / G.rate; }

static uint64_t splitmix64(void) {
    uint64_t z = (G.rng += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (!q) die(1, "out of memory (%zu bytes)", n);
    return q;
}

/* ---- argument parsing ---------------------------------------------------------------- */

static double arg_double(const char *s, const char *name, double lo, int lo_open) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || (lo_open && v == lo))
        die(2, "bad %s: '%s' (a number %s %g)", name, s, lo_open ? ">" : ">=", lo);
    return v;
}

static long arg_long(const char *s, const char *name, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        die(2, "bad %s: '%s' (an integer in %ld..%ld)", name, s, lo, hi);
    return v;
}

static void read_paths(const char *file, const char *host) {
    FILE *f = fopen(file, "r");
    if (!f) die(2, "cannot read PATHS_FILE %s: %s", file, strerror(errno));
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int alloc = 0;
    while ((n = getline(&line, &cap, f)) >= 0) {
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        if (n == 0) continue;
        for (ssize_t k = 0; k < n; k++)
            if ((unsigned char)line[k] <= ' ' || line[k] == 0x7f)
                die(2, "bad path in PATHS_FILE (whitespace or control character): '%s'", line);
        if (G.npaths == alloc) {
            alloc = alloc ? 2 * alloc : 16;
            G.req = xrealloc(G.req, alloc * sizeof *G.req);
            G.reqlen = xrealloc(G.reqlen, alloc * sizeof *G.reqlen);
        }
        size_t sz = (size_t)n + strlen(host) + 64;
        char *r = xrealloc(NULL, sz);
        int len = snprintf(r, sz, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: keep-alive\r\n\r\n",
                           line, host);
        G.req[G.npaths] = r;
        G.reqlen[G.npaths++] = (size_t)len;
    }
    free(line);
    fclose(f);
    if (G.npaths == 0) die(2, "PATHS_FILE %s has no paths", file);
}

/* ---- samples ------------------------------------------------------------------------- */

/* Append a printf-formatted line tail to the arena and attach it to request `req`. */
static void record(int req, int kind, const char *fmt, ...) {
    if (G.acap - G.alen < 4096) {
        G.acap = G.acap * 2 + 65536;
        if (G.acap > UINT32_MAX) die(1, "sample arena over 4 GiB");
        G.arena = xrealloc(G.arena, G.acap);
    }
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(G.arena + G.alen, G.acap - G.alen, fmt, ap);
    va_end(ap);
    G.samples[req].off = (uint32_t)G.alen;
    G.samples[req].len = (uint32_t)n;
    G.samples[req].kind = (uint8_t)kind;
    G.alen += (size_t)n;
    G.done++;
}

/* Copy a value for the TSV: no tabs, newlines or control characters, `-` when empty. */
static void clean(char *out, const char *in, size_t n) {
    size_t k = 0;
    for (size_t j = 0; j < n && k < FIELD_MAX; j++)
        out[k++] = ((unsigned char)in[j] < ' ' || in[j] == 0x7f) ? '_' : in[j];
    if (k == 0) out[k++] = '-';
    out[k] = 0;
}

/* Position just past `"key"` + optional whitespace + ':' + optional whitespace, or NULL. */
static const char *json_value(const char *b, size_t n, const char *key) {
    size_t kl = strlen(key);
    const char *p = memmem(b, n, key, kl), *end = b + n;
    if (!p) return NULL;
    p += kl;
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')) p++;
    if (p >= end || *p != ':') return NULL;
    p++;
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')) p++;
    return p < end ? p : NULL;
}

/* A JSON string value (escapes taken literally: `\"` gives `"`), `-` for null or absent. */
static void json_string(const char *b, size_t n, const char *key, char *out) {
    const char *p = json_value(b, n, key), *end = b + n;
    if (!p || *p != '"') {
        strcpy(out, "-");
        return;
    }
    char tmp[FIELD_MAX];
    size_t k = 0;
    for (p++; p < end && *p != '"'; p++) {
        if (*p == '\\' && p + 1 < end) p++;
        if (k < sizeof tmp) tmp[k++] = *p;
    }
    clean(out, tmp, k);
}

/* ---- connections --------------------------------------------------------------------- */

static void close_conn(slot_t *s) {
    if (s->fd >= 0) close(s->fd); /* closing also removes it from the epoll set */
    s->fd = -1;
    s->events = 0;
}

static void release(slot_t *s) {
    s->state = S_FREE;
    s->req = -1;
    G.freestack[G.nfree++] = (int)(s - G.slots);
}

static void fail(slot_t *s, int kind) {
    record(s->req, kind, kind == K_TIMEOUT ? "-\ttimeout\t-\t-\t-\t-\t-" : "-\terror\t-\t-\t-\t-\t-");
    close_conn(s);
    release(s);
}

static int open_conn(slot_t *s) {
    int fd = socket(G.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&G.addr, G.addrlen) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    s->gen++;
    s->fd = fd;
    s->events = 0;
    return 0;
}

/* Edge-triggered interest in `events` (EPOLLIN, plus EPOLLOUT while a send waits). The socket
 * joins the epoll set only after the first send attempt: on loopback the connection is
 * usually established by then, and registering EPOLLOUT earlier costs a wakeup per request. */
static int watch(slot_t *s, uint32_t events) {
    events |= EPOLLRDHUP | EPOLLET;
    if (s->events == events) return 0;
    struct epoll_event ev = {.events = events,
                             .data.u64 = ((uint64_t)s->gen << 32) | (uint32_t)(s - G.slots)};
    if (epoll_ctl(G.epfd, s->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s->fd, &ev) < 0) return -1;
    s->events = events;
    return 0;
}

static void progress(slot_t *s);

/* (Re)send the slot's request from the start: on its kept-alive connection or a new one. */
static void begin(slot_t *s, int reuse_ok) {
    s->reused = reuse_ok && s->fd >= 0;
    if (!s->reused) {
        close_conn(s);
        if (open_conn(s) < 0) {
            fail(s, K_ERROR);
            return;
        }
    }
    s->state = S_SENDING;
    s->sent = 0;
    s->len = 0;
    s->head_len = 0;
    s->retry[0] = 0;
    progress(s); /* on loopback the connect has usually completed already */
}

/* A kept-alive connection found closed before any byte of the response: reopen once. */
static int retry_fresh(slot_t *s) {
    if (!s->reused || s->len != 0) return 0;
    begin(s, 0);
    return 1;
}

static void dispatch(int req, double now) {
    slot_t *s = &G.slots[G.freestack[--G.nfree]];
    s->req = req;
    s->path = (int)(((splitmix64() >> 32) * (uint64_t)G.npaths) >> 32);
    s->deadline = now + G.timeout;
    begin(s, 1);
}

/* ---- response parsing ---------------------------------------------------------------- */

static int header_is(const char *line, size_t n, const char *name, const char **value,
                     size_t *vlen) {
    size_t nl = strlen(name);
    if (n <= nl || line[nl] != ':' || strncasecmp(line, name, nl) != 0) return 0;
    const char *v = line + nl + 1, *e = line + n;
    while (v < e && (*v == ' ' || *v == '\t')) v++;
    while (e > v && (e[-1] == ' ' || e[-1] == '\t')) e--;
    *value = v;
    *vlen = (size_t)(e - v);
    return 1;
}

static int has_token(const char *v, size_t n, const char *tok) {
    size_t tl = strlen(tok);
    for (size_t i = 0; i + tl <= n; i++)
        if (strncasecmp(v + i, tok, tl) == 0 && (i == 0 || v[i - 1] == ',' || v[i - 1] == ' ') &&
            (i + tl == n || v[i + tl] == ',' || v[i + tl] == ' '))
            return 1;
    return 0;
}

/* Parse the head once it is complete. Returns -1 on a malformed head. */
static int parse_head(slot_t *s, size_t head_len) {
    const char *b = s->buf;
    const char *eol = memmem(b, head_len, "\r\n", 2);
    if (!eol || eol - b < 12 || strncmp(b, "HTTP/1.", 7) != 0 || b[8] != ' ') return -1;
    int http10 = b[7] == '0';
    if (b[9] < '1' || b[9] > '9' || b[10] < '0' || b[10] > '9' || b[11] < '0' || b[11] > '9' ||
        (eol - b > 12 && b[12] != ' '))
        return -1;
    s->status = (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
    int have_len = 0, keep = 0;
    s->close = 0;
    s->body_mode = B_LENGTH;
    s->clen = 0;
    const char *end = b + head_len - 2; /* the final empty line */
    for (const char *line = eol + 2; line < end;) {
        const char *next = memmem(line, (size_t)(end - line), "\r\n", 2);
        size_t n = next ? (size_t)(next - line) : (size_t)(end - line);
        const char *v;
        size_t vl;
        if (header_is(line, n, "content-length", &v, &vl)) {
            char *e;
            errno = 0;
            unsigned long long cl = strtoull(v, &e, 10);
            if (vl == 0 || e != v + vl || errno || cl > MAX_RESPONSE || v[0] == '-') return -1;
            s->clen = (size_t)cl;
            have_len = 1;
        } else if (header_is(line, n, "connection", &v, &vl)) {
            if (has_token(v, vl, "close")) s->close = 1;
            if (has_token(v, vl, "keep-alive")) keep = 1;
        } else if (header_is(line, n, "transfer-encoding", &v, &vl)) {
            if (has_token(v, vl, "chunked")) s->body_mode = B_CHUNKED;
            else if (!(vl == 8 && strncasecmp(v, "identity", 8) == 0)) return -1;
        } else if (header_is(line, n, "retry-after", &v, &vl)) {
            clean(s->retry, v, vl < sizeof s->retry - 1 ? vl : sizeof s->retry - 1);
        }
        line += n + 2;
    }
    if (http10 && !keep) s->close = 1;
    int bodyless = (s->status >= 100 && s->status < 200) || s->status == 204 || s->status == 304;
    if (bodyless) {
        s->body_mode = B_LENGTH;
        s->clen = 0;
    } else if (s->body_mode != B_CHUNKED && !have_len) {
        /* No framing: the body runs to the end of the connection. */
        s->body_mode = B_EOF;
        s->close = 1;
    }
    s->cpos = head_len;
    return 0;
}

/* 1: the response is complete, 0: more is needed, -1: malformed. */
static int chunked_done(slot_t *s) {
    for (;;) {
        const char *p = s->buf + s->cpos, *end = s->buf + s->len;
        const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (!eol) return (end - p) > 1024 ? -1 : 0;
        char *e;
        errno = 0;
        unsigned long long size = strtoull(p, &e, 16);
        if (e == p || errno || size > MAX_RESPONSE || (e != eol && *e != ';' && *e != ' '))
            return -1;
        if (size == 0) {
            /* Trailer section: zero or more header lines, then an empty line. */
            const char *t = eol + 2;
            for (;;) {
                const char *te = memmem(t, (size_t)(end - t), "\r\n", 2);
                if (!te) return 0;
                if (te == t) return 1;
                t = te + 2;
            }
        }
        size_t need = (size_t)(eol + 2 - s->buf) + (size_t)size + 2;
        if (s->len < need) return 0;
        if (memcmp(s->buf + need - 2, "\r\n", 2) != 0) return -1;
        s->cpos = need;
    }
}

/* Join the chunks of a complete chunked body in place; returns the body length. */
static size_t dechunk(slot_t *s) {
    char *out = s->buf + s->head_len;
    const char *p = out;
    for (;;) {
        const char *eol = memmem(p, (size_t)(s->buf + s->len - p), "\r\n", 2);
        size_t size = (size_t)strtoull(p, NULL, 16); /* validated by chunked_done */
        if (size == 0) break;
        memmove(out, eol + 2, size);
        out += size;
        p = eol + 2 + size + 2;
    }
    return (size_t)(out - (s->buf + s->head_len));
}

static void complete(slot_t *s, double t) {
    const char *body = s->buf + s->head_len;
    size_t blen = s->body_mode == B_CHUNKED  ? dechunk(s)
                  : s->body_mode == B_LENGTH ? s->clen
                                             : s->len - s->head_len;
    char source[FIELD_MAX + 1] = "-", reason[FIELD_MAX + 1] = "-", model[FIELD_MAX + 1] = "-";
    char degraded = '-';
    const char *p = body;
    while (p < body + blen && (*p == ' ' || *p == '\r' || *p == '\n' || *p == '\t')) p++;
    if (p < body + blen && *p == '{') {
        json_string(body, blen, "\"source\"", source);
        json_string(body, blen, "\"degrade_reason\"", reason);
        json_string(body, blen, "\"model_version\"", model);
        const char *v = json_value(body, blen, "\"degraded\"");
        size_t left = v ? (size_t)(body + blen - v) : 0;
        if (v && left >= 4 && memcmp(v, "true", 4) == 0) degraded = '1';
        else if (v && left >= 5 && memcmp(v, "false", 5) == 0) degraded = '0';
    }
    record(s->req, K_RESPONSE, "%.2f\t%d\t%s\t%c\t%s\t%s\t%s", (t - sched(s->req)) * 1000.0,
           s->status, source, degraded, reason, model, s->retry[0] ? s->retry : "-");
    if (s->close) close_conn(s);
    release(s);
}

/* 1: complete, 0: more needed, -1: malformed. */
static int parse(slot_t *s, size_t before) {
    if (!s->head_len) {
        size_t from = before > 3 ? before - 3 : 0;
        const char *h = memmem(s->buf + from, s->len - from, "\r\n\r\n", 4);
        if (!h) return s->len > MAX_HEAD ? -1 : 0;
        s->head_len = (size_t)(h + 4 - s->buf);
        if (parse_head(s, s->head_len) < 0) return -1;
    }
    switch (s->body_mode) {
    case B_LENGTH:
        return s->len >= s->head_len + s->clen ? 1 : 0; /* extra bytes are ignored */
    case B_CHUNKED:
        return chunked_done(s);
    default:
        return s->len > MAX_RESPONSE ? -1 : 0; /* B_EOF: complete at EOF */
    }
}

/* Advance a busy slot as far as its socket allows (edge-triggered: until EAGAIN). */
static void progress(slot_t *s) {
    if (s->state == S_SENDING) {
        while (s->sent < G.reqlen[s->path]) {
            ssize_t n = send(s->fd, G.req[s->path] + s->sent, G.reqlen[s->path] - s->sent,
                             MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (errno != EAGAIN && errno != EWOULDBLOCK) {
                    if (!retry_fresh(s)) fail(s, K_ERROR);
                } else if (watch(s, EPOLLIN | EPOLLOUT) < 0) { /* connecting, or buffer full */
                    fail(s, K_ERROR);
                }
                return;
            }
            s->sent += (size_t)n;
        }
        s->state = S_READING; /* the response comes with an EPOLLIN edge */
        if (!s->events && watch(s, EPOLLIN) < 0) fail(s, K_ERROR);
        return;
    }
    while (s->state == S_READING) {
        if (s->cap - s->len < 4096) {
            s->cap = s->cap ? 2 * s->cap : 16384;
            s->buf = xrealloc(s->buf, s->cap);
        }
        ssize_t n = recv(s->fd, s->buf + s->len, s->cap - s->len, 0);
        if (n > 0) {
            size_t before = s->len;
            s->len += (size_t)n;
            int r = parse(s, before);
            if (r > 0) complete(s, now_s());
            else if (r < 0) fail(s, K_ERROR);
        } else if (n == 0) {
            if (s->head_len && s->body_mode == B_EOF) complete(s, now_s());
            else if (!retry_fresh(s)) fail(s, K_ERROR);
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return;
        } else if (errno != EINTR) {
            if (!retry_fresh(s)) fail(s, K_ERROR);
        }
    }
}

/* ---- main loop ----------------------------------------------------------------------- */

static int wait_events(struct epoll_event *evs, int max, double timeout_s) {
    static int no_pwait2;
    if (timeout_s < 0) timeout_s = 0;
    if (!no_pwait2) {
        time_t sec = (time_t)timeout_s;
        struct timespec ts = {sec, (long)((timeout_s - (double)sec) * 1e9)};
        int n = (int)syscall(SYS_epoll_pwait2, G.epfd, evs, max, &ts, NULL, 0);
        if (n >= 0 || errno != ENOSYS) return n;
        no_pwait2 = 1;
    }
    double ms = timeout_s * 1000.0; /* kernels before 5.11: whole milliseconds, rounded up */
    return epoll_wait(G.epfd, evs, max, ms > 1e9 ? 1000000000 : (int)ms + ((double)(int)ms < ms));
}

int main(int argc, char **argv) {
    if (argc != 10)
        die(2, "usage: openloop HOST PORT RATE DURATION_S CONNECTIONS TIMEOUT_S PATHS_FILE "
               "SAMPLES_FILE SEED");
    const char *host = argv[1];
    if (!*host) die(2, "bad HOST: empty");
    arg_long(argv[2], "PORT", 1, 65535); /* getaddrinfo takes it as a string */
    G.rate = arg_double(argv[3], "RATE", 0, 1);
    double duration = arg_double(argv[4], "DURATION_S", 0, 0);
    G.conns = (int)arg_long(argv[5], "CONNECTIONS", 1, 1000000);
    G.timeout = arg_double(argv[6], "TIMEOUT_S", 0, 1);
    char *end;
    errno = 0;
    G.rng = strtoull(argv[9], &end, 10);
    if (errno || end == argv[9] || *end || argv[9][0] == '-')
        die(2, "bad SEED: '%s' (a non-negative integer)", argv[9]);
    double total = G.rate * duration;
    if (total >= 2e9) die(2, "RATE * DURATION_S is too large (%g requests)", total);
    G.total = (int)total; /* floor, as Python's int() */
    read_paths(argv[7], host);

    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    int rc = getaddrinfo(host, argv[2], &hints, &ai);
    if (rc) die(2, "cannot resolve HOST %s: %s", host, gai_strerror(rc));
    memcpy(&G.addr, ai->ai_addr, ai->ai_addrlen);
    G.addrlen = ai->ai_addrlen;
    G.family = ai->ai_family;
    freeaddrinfo(ai);

    FILE *out = fopen(argv[8], "w");
    if (!out) die(2, "cannot write SAMPLES_FILE %s: %s", argv[8], strerror(errno));

    /* One descriptor per connection, plus a few. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)G.conns + 64) {
        rl.rlim_cur = rl.rlim_max < (rlim_t)G.conns + 64 ? rl.rlim_max : (rlim_t)G.conns + 64;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    G.samples = calloc(G.total ? (size_t)G.total : 1, sizeof *G.samples);
    G.slots = calloc((size_t)G.conns, sizeof *G.slots);
    G.freestack = calloc((size_t)G.conns, sizeof *G.freestack);
    G.acap = (size_t)G.total * 48 + 65536;
    if (G.acap > UINT32_MAX) G.acap = UINT32_MAX;
    G.arena = malloc(G.acap);
    if (!G.samples || !G.slots || !G.freestack || !G.arena) die(1, "out of memory");
    for (int k = G.conns - 1; k >= 0; k--) {
        G.slots[k].fd = -1;
        G.slots[k].req = -1;
        G.freestack[G.nfree++] = k;
    }
    /* Wake on time: the default 50 us timer slack would delay every scheduled send. */
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
    G.epfd = epoll_create1(EPOLL_CLOEXEC);
    if (G.epfd < 0) die(1, "epoll_create1: %s", strerror(errno));

    struct epoll_event evs[256];
    int next = 0;
    G.start = now_s() + LEAD_S;
    while (G.done < G.total) {
        double now = now_s();
        for (int k = 0; k < G.conns; k++) /* client timeouts */
            if (G.slots[k].state != S_FREE && now >= G.slots[k].deadline)
                fail(&G.slots[k], K_TIMEOUT);
        /* Due requests take free slots in schedule (FIFO) order. */
        while (next < G.total && G.nfree > 0 && sched(next) <= now) dispatch(next++, now);
        if (G.done >= G.total) break;
        /* Sleep until the next send (if a slot is free for it), deadline or I/O. */
        double wake = next < G.total && G.nfree > 0 ? sched(next) : INFINITY;
        for (int k = 0; k < G.conns; k++)
            if (G.slots[k].state != S_FREE && G.slots[k].deadline < wake)
                wake = G.slots[k].deadline;
        int n = wait_events(evs, 256, wake == INFINITY ? 1.0 : wake - now_s());
        if (n < 0 && errno != EINTR) die(1, "epoll_wait: %s", strerror(errno));
        for (int e = 0; e < n; e++) {
            slot_t *s = &G.slots[(uint32_t)evs[e].data.u64];
            if ((uint32_t)(evs[e].data.u64 >> 32) != s->gen || s->fd < 0) continue; /* stale */
            if (s->state == S_FREE) {
                /* An idle kept-alive connection: the server closed it, or sent junk. */
                char junk[512];
                ssize_t r = recv(s->fd, junk, sizeof junk, 0);
                if (r >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) close_conn(s);
                continue;
            }
            progress(s);
        }
    }
    double elapsed = now_s() - G.start;
    for (int k = 0; k < G.conns; k++) close_conn(&G.slots[k]);

    static char obuf[1 << 16];
    setvbuf(out, obuf, _IOFBF, sizeof obuf);
    fprintf(out, "# started_at_monotonic=%.9f elapsed_s=%.6f requests=%d rate=%.17g "
                 "generator=c-openloop\n",
            G.start, elapsed, G.total, G.rate);
    for (int i = 0; i < G.total; i++) {
        fprintf(out, "%.4f\t", (double)i / G.rate);
        fwrite(G.arena + G.samples[i].off, 1, G.samples[i].len, out);
        fputc('\n', out);
    }
    if (fclose(out) != 0) die(1, "cannot write SAMPLES_FILE %s: %s", argv[8], strerror(errno));
    return 0;
}
