/*
 * loadgen: a small open-loop HTTP/1.1 load generator (the harness's stand-in for wrk2, which
 * Debian does not package).
 *
 * Request i is *intended* to be sent at start + i/rate, whatever happened before. It goes out
 * on any idle keep-alive connection; when none is idle it waits in a queue, and its latency is
 * still measured from the intended send time. So a server stall shows up in the percentiles
 * as it would for real clients (no coordinated omission), instead of silently lowering the
 * offered rate as a closed-loop tool (wrk) does.
 *
 * Usage:
 *   loadgen -R RATE -d SECONDS [-w WARMUP_SECONDS] [-c CONNECTIONS] [-H 'Name: value']...
 *           [-K KEYFILE -N HEADER_NAME] [-s SOURCE_IP] HOST PORT PATH
 *
 * -K/-N: one API key per line in KEYFILE; request i carries key i mod n in header HEADER_NAME.
 * Output: one JSON object on stdout (latencies in microseconds).
 * Build:  gcc -O2 -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 1024
#define BUF_SIZE 65536

typedef struct {
    int fd;
    int busy;            /* a request is outstanding */
    int connected;
    uint64_t intended_ns; /* intended send time of the outstanding request */
    int record;          /* outside the warm-up: record its latency */
    char buf[BUF_SIZE];
    size_t len;
} conn_t;

static conn_t conns[MAX_CONNS];
static int n_conns = 16;
static int epfd;
static struct sockaddr_in target;
static struct sockaddr_in source;
static int use_source = 0;

static char **reqs;      /* pre-rendered requests (one per key, or one) */
static size_t *req_lens;
static int n_reqs = 1;

static uint32_t *lat_us;
static size_t n_lat = 0, cap_lat = 0;
static long status_counts[6];
static long errors = 0, reconnects = 0, timeouts = 0, sent = 0, completed = 0;
static uint64_t max_backlog = 0, max_send_lag_ns = 0;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int open_conn(conn_t *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (use_source && bind(fd, (struct sockaddr *)&source, sizeof source) < 0) {
        perror("bind source");
        exit(2);
    }
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    c->fd = fd;
    c->busy = 0;
    c->connected = 0;
    c->len = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

static void close_conn(conn_t *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->connected = 0;
    c->busy = 0;
    c->len = 0;
}

static void record(uint64_t latency_ns) {
    if (n_lat == cap_lat) {
        cap_lat = cap_lat ? cap_lat * 2 : 65536;
        lat_us = realloc(lat_us, cap_lat * sizeof *lat_us);
        if (!lat_us) exit(3);
    }
    uint64_t us = latency_ns / 1000;
    lat_us[n_lat++] = us > 0xffffffffu ? 0xffffffffu : (uint32_t)us;
}

/* Returns the length of one complete response at the start of buf, 0 if incomplete, -1 if bad.
 * Sets *status and *close_after. Handles Content-Length and chunked bodies. */
static long parse_response(const char *buf, size_t len, int *status, int *close_after) {
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (!end) return len > BUF_SIZE - 1024 ? -1 : 0;
    size_t head = (size_t)(end - buf) + 4;
    if (len < 12 || memcmp(buf, "HTTP/1.", 7) != 0) return -1;
    *status = atoi(buf + 9);
    *close_after = 0;
    long content_length = -1;
    int chunked = 0;
    const char *line = memchr(buf, '\n', head) + 1;
    while (line < buf + head - 2) {
        const char *eol = memchr(line, '\n', (size_t)(buf + head - line));
        if (!eol) break;
        if (!strncasecmp(line, "content-length:", 15)) content_length = atol(line + 15);
        else if (!strncasecmp(line, "transfer-encoding:", 18) && memmem(line, (size_t)(eol - line), "chunked", 7)) chunked = 1;
        else if (!strncasecmp(line, "connection:", 11) && memmem(line, (size_t)(eol - line), "close", 5)) *close_after = 1;
        line = eol + 1;
    }
    if (*status == 204 || *status == 304 || (*status >= 100 && *status < 200)) return (long)head;
    if (chunked) {
        size_t pos = head;
        for (;;) {
            const char *crlf = memmem(buf + pos, len - pos, "\r\n", 2);
            if (!crlf) return 0;
            long size = strtol(buf + pos, NULL, 16);
            pos = (size_t)(crlf - buf) + 2;
            if (size == 0) {
                /* no trailers expected: the final CRLF */
                if (len - pos < 2) return 0;
                return (long)(pos + 2);
            }
            if (len - pos < (size_t)size + 2) return 0;
            pos += (size_t)size + 2;
        }
    }
    if (content_length < 0) return -1; /* read-until-close bodies are not supported */
    if (len - head < (size_t)content_length) return 0;
    return (long)(head + (size_t)content_length);
}

static void send_request(conn_t *c, uint64_t intended, int rec, uint64_t index) {
    int r = (int)(index % (uint64_t)n_reqs);
    ssize_t w = send(c->fd, reqs[r], req_lens[r], MSG_NOSIGNAL);
    c->busy = 1;
    c->intended_ns = intended;
    c->record = rec;
    sent++;
    if (w != (ssize_t)req_lens[r]) {
        /* a short write on an idle keep-alive socket with a tiny request: treat as an error */
        errors++;
        close_conn(c);
        reconnects++;
        open_conn(c);
    }
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p) {
    if (!n_lat) return -1;
    size_t i = (size_t)(p / 100.0 * (double)n_lat);
    if (i >= n_lat) i = n_lat - 1;
    return lat_us[i];
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen -R RATE -d SECONDS [-w WARMUP] [-c CONNS] [-H 'Name: v']... "
                    "[-K KEYFILE -N HEADER] [-s SOURCE_IP] HOST PORT PATH\n");
    exit(2);
}

int main(int argc, char **argv) {
    double rate = 0, duration = 0, warmup = 1.0;
    char headers[8192] = "";
    const char *keyfile = NULL, *keyheader = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "R:d:w:c:H:K:N:s:")) != -1) {
        switch (opt) {
        case 'R': rate = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'c': n_conns = atoi(optarg); break;
        case 'H':
            if (strlen(headers) + strlen(optarg) + 3 >= sizeof headers) usage();
            strcat(headers, optarg);
            strcat(headers, "\r\n");
            break;
        case 'K': keyfile = optarg; break;
        case 'N': keyheader = optarg; break;
        case 's':
            use_source = 1;
            source.sin_family = AF_INET;
            if (inet_pton(AF_INET, optarg, &source.sin_addr) != 1) usage();
            break;
        default: usage();
        }
    }
    if (argc - optind != 3 || rate <= 0 || duration <= 0 || n_conns < 1 || n_conns > MAX_CONNS) usage();
    const char *host = argv[optind], *path = argv[optind + 2];
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)atoi(argv[optind + 1]));
    if (inet_pton(AF_INET, host, &target.sin_addr) != 1) usage();

    /* Pre-render every request. */
    char **keys = NULL;
    if (keyfile) {
        if (!keyheader) usage();
        FILE *f = fopen(keyfile, "r");
        if (!f) { perror(keyfile); return 2; }
        size_t cap = 1024;
        keys = malloc(cap * sizeof *keys);
        n_reqs = 0;
        char line[512];
        while (fgets(line, sizeof line, f)) {
            line[strcspn(line, "\r\n")] = 0;
            if (!*line) continue;
            if ((size_t)n_reqs == cap) keys = realloc(keys, (cap *= 2) * sizeof *keys);
            keys[n_reqs++] = strdup(line);
        }
        fclose(f);
        if (!n_reqs) { fprintf(stderr, "no keys in %s\n", keyfile); return 2; }
    }
    reqs = malloc((size_t)n_reqs * sizeof *reqs);
    req_lens = malloc((size_t)n_reqs * sizeof *req_lens);
    for (int i = 0; i < n_reqs; i++) {
        char key_line[600] = "";
        if (keys) snprintf(key_line, sizeof key_line, "%s: %s\r\n", keyheader, keys[i]);
        size_t size = strlen(path) + strlen(host) + strlen(headers) + strlen(key_line) + 64;
        reqs[i] = malloc(size);
        req_lens[i] = (size_t)snprintf(reqs[i], size, "GET %s HTTP/1.1\r\nHost: %s:%s\r\n%s%s\r\n",
                                       path, host, argv[optind + 1], headers, key_line);
    }

    epfd = epoll_create1(0);
    for (int i = 0; i < n_conns; i++)
        if (open_conn(&conns[i]) < 0) { perror("connect"); return 2; }
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &tev);

    /* Let the connections establish before the clock starts. */
    uint64_t settle_until = now_ns() + 200000000ull;
    while (now_ns() < settle_until) {
        struct epoll_event evs[64];
        int n = epoll_wait(epfd, evs, 64, 10);
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) continue;
            if (evs[i].events & EPOLLOUT) {
                c->connected = 1;
                struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
                epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
            }
        }
    }

    const double interval_ns = 1e9 / rate;
    const uint64_t start = now_ns();
    const uint64_t total = (uint64_t)((warmup + duration) * rate);
    const uint64_t record_from = (uint64_t)(warmup * rate);
    const uint64_t end_send = start + (uint64_t)((warmup + duration) * 1e9);
    const uint64_t deadline = end_send + 3000000000ull; /* stragglers get 3 s */
    uint64_t next = 0; /* index of the next request to send */
    int idle_hint = 0;

    for (;;) {
        uint64_t now = now_ns();
        /* Send every request whose intended time has come, while a connection is idle. */
        while (next < total) {
            uint64_t intended = start + (uint64_t)((double)next * interval_ns);
            if (intended > now) break;
            conn_t *c = NULL;
            for (int k = 0; k < n_conns; k++) {
                conn_t *cand = &conns[(idle_hint + k) % n_conns];
                if (cand->fd >= 0 && cand->connected && !cand->busy) { c = cand; idle_hint = (idle_hint + k + 1) % n_conns; break; }
            }
            if (!c) {
                uint64_t backlog = (uint64_t)((double)(now - start) / interval_ns) - next;
                if (backlog > max_backlog) max_backlog = backlog;
                break;
            }
            if (now - intended > max_send_lag_ns && next >= record_from) max_send_lag_ns = now - intended;
            send_request(c, intended, next >= record_from, next);
            next++;
        }
        int outstanding = 0;
        for (int k = 0; k < n_conns; k++) outstanding += conns[k].busy;
        if (next >= total && !outstanding) break;
        if (now > deadline) { timeouts += outstanding + (long)(total - next); break; }

        /* Sleep until the next intended send (timerfd: sub-millisecond precision) or an event. */
        if (next < total) {
            uint64_t intended = start + (uint64_t)((double)next * interval_ns);
            struct itimerspec its = {0};
            uint64_t at = intended > now ? intended : now + 1000;
            its.it_value.tv_sec = (time_t)(at / 1000000000ull);
            its.it_value.tv_nsec = (long)(at % 1000000000ull);
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
        }
        struct epoll_event evs[256];
        int n = epoll_wait(epfd, evs, 256, 100);
        uint64_t t = now_ns();
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) { uint64_t x; (void)!read(tfd, &x, sizeof x); continue; }
            if (c->fd < 0) continue;
            if ((evs[i].events & EPOLLOUT) && !c->connected) {
                c->connected = 1;
                struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
                epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
            }
            if (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                int dead = 0;
                for (;;) {
                    ssize_t r = recv(c->fd, c->buf + c->len, BUF_SIZE - c->len, 0);
                    if (r > 0) { c->len += (size_t)r; if (c->len == BUF_SIZE) break; continue; }
                    if (r == 0) dead = 1;
                    else if (errno != EAGAIN && errno != EWOULDBLOCK) dead = 1;
                    break;
                }
                while (c->len && c->busy) {
                    int status = 0, close_after = 0;
                    long used = parse_response(c->buf, c->len, &status, &close_after);
                    if (used == 0) break;
                    if (used < 0) { dead = 1; break; }
                    if (c->record) {
                        record(t - c->intended_ns);
                        int cls = status / 100;
                        if (cls >= 1 && cls <= 5) status_counts[cls]++;
                        else status_counts[0]++;
                    }
                    completed++;
                    memmove(c->buf, c->buf + used, c->len - (size_t)used);
                    c->len -= (size_t)used;
                    c->busy = 0;
                    if (close_after) { dead = 1; break; }
                }
                if (dead) {
                    if (c->busy) errors++;
                    close_conn(c);
                    reconnects++;
                    open_conn(c);
                }
            }
        }
    }
    uint64_t elapsed = now_ns() - start;
    qsort(lat_us, n_lat, sizeof *lat_us, cmp_u32);
    double sum = 0;
    for (size_t i = 0; i < n_lat; i++) sum += lat_us[i];
    printf("{\"rate\": %.1f, \"duration_s\": %.3f, \"connections\": %d, \"sent\": %ld, \"completed\": %ld, "
           "\"recorded\": %zu, \"errors\": %ld, \"timeouts\": %ld, \"reconnects\": %ld, "
           "\"status\": {\"1xx\": %ld, \"2xx\": %ld, \"3xx\": %ld, \"4xx\": %ld, \"5xx\": %ld, \"other\": %ld}, "
           "\"max_backlog\": %llu, \"max_send_lag_us\": %.1f, \"elapsed_s\": %.3f, "
           "\"latency_us\": {\"mean\": %.1f, \"p50\": %.0f, \"p90\": %.0f, \"p99\": %.0f, \"p99.9\": %.0f, \"max\": %.0f}}\n",
           rate, duration, n_conns, sent, completed, n_lat, errors, timeouts, reconnects,
           status_counts[1], status_counts[2], status_counts[3], status_counts[4], status_counts[5], status_counts[0],
           (unsigned long long)max_backlog, max_send_lag_ns / 1000.0, elapsed / 1e9,
           n_lat ? sum / (double)n_lat : -1.0, pct(50), pct(90), pct(99), pct(99.9), n_lat ? (double)lat_us[n_lat - 1] : -1.0);
    return 0;
}
