/*
 * Load generator and origin server for the fwdproxy benchmark (loopback only).
 *
 * Compiled at run time by bench/run.py (gcc -O2). One epoll thread per process; the harness
 * pins it to the CPU that the proxy does not use. Every mode is bounded in time or count.
 *
 *   loadgen origin ADDR:PORT[,ADDR:PORT...]
 *       "BULK <n>\n"          -> n bytes of payload, then close
 *       HTTP/1.1 request head -> "200 OK", Content-Length: 2, body "ok" (keep-alive unless
 *                                the request says Connection: close)
 *   loadgen bulk  MODE PROXY ORIGIN BYTES              one tunnel, prints JSON
 *   loadgen short MODE PROXY ORIGIN CONC WARMUP_S SECS  tunnels/s + latency, prints JSON
 *   loadgen idle  MODE PROXY ORIGIN N1,N2,...          opens N tunnels per step, prints
 *                                                      "STEP n ok err stalled", waits for a
 *                                                      stdin line (stalled: handshakes still
 *                                                      unanswered after 5 s without progress)
 * MODE: direct | connect | socks5 | http (http = plain absolute-URI forwarding).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { M_DIRECT, M_CONNECT, M_SOCKS5, M_HTTP };
static const char *HTTP_RESP = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";
static char bulkbuf[1 << 20];

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void raise_nofile(void) {
    struct rlimit rl = {200000, 200000};
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
        getrlimit(RLIMIT_NOFILE, &rl);
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void parse_addr(const char *s, struct sockaddr_in *a) {
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || colon - s >= (long)sizeof host) {
        fprintf(stderr, "bad address %s\n", s);
        exit(2);
    }
    memcpy(host, s, colon - s);
    host[colon - s] = 0;
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons(atoi(colon + 1));
    if (inet_pton(AF_INET, host, &a->sin_addr) != 1) {
        fprintf(stderr, "bad host %s\n", host);
        exit(2);
    }
    if ((ntohl(a->sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "refusing non-loopback address %s\n", s);
        exit(2);
    }
}

static int mode_of(const char *s) {
    if (!strcmp(s, "direct")) return M_DIRECT;
    if (!strcmp(s, "connect")) return M_CONNECT;
    if (!strcmp(s, "socks5")) return M_SOCKS5;
    if (!strcmp(s, "http")) return M_HTTP;
    fprintf(stderr, "bad mode %s\n", s);
    exit(2);
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* ------------------------------------------------------------------------------------------ */
/* origin                                                                                     */

typedef struct {
    int fd;
    int listener;
    long long bulk_left;
    int close_after;
    int out_len, out_off;
    char out[256];
    int in_len;
    char in[4096];
} oconn;

static int origin_main(int argc, char **argv) {
    if (argc < 1) return 2;
    raise_nofile();
    memset(bulkbuf, 'x', sizeof bulkbuf);
    int ep = epoll_create1(0);
    char *list = strdup(argv[0]);
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        struct sockaddr_in a;
        parse_addr(tok, &a);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 4096)) die("origin listen");
        oconn *c = calloc(1, sizeof *c);
        c->fd = fd;
        c->listener = 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    printf("READY\n");
    fflush(stdout);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, 1000);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            oconn *c = evs[i].data.ptr;
            if (c->listener) {
                for (int k = 0; k < 64; k++) {
                    int fd = accept4(c->fd, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    nodelay(fd);
                    oconn *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            int dead = 0;
            if (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                for (;;) {
                    if (c->in_len >= (int)sizeof c->in) { dead = 1; break; }
                    ssize_t r = recv(c->fd, c->in + c->in_len, sizeof c->in - c->in_len, 0);
                    if (r == 0) { dead = 1; break; }
                    if (r < 0) { if (errno != EAGAIN) dead = 1; break; }
                    c->in_len += r;
                }
                /* handle complete requests */
                for (;;) {
                    if (c->bulk_left || c->out_len) break;
                    if (c->in_len >= 5 && !memcmp(c->in, "BULK ", 5)) {
                        char *nl = memchr(c->in, '\n', c->in_len);
                        if (!nl) break;
                        c->bulk_left = atoll(c->in + 5);
                        c->close_after = 1;
                        c->in_len = 0;
                        dead = 0; /* a client may half-close after its request */
                        break;
                    }
                    c->in[c->in_len < (int)sizeof c->in ? c->in_len : (int)sizeof c->in - 1] = 0;
                    char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
                    if (!end) break;
                    int used = end + 4 - c->in;
                    c->close_after = memmem(c->in, used, "onnection: close", 16) != NULL;
                    int rl = strlen(HTTP_RESP);
                    memcpy(c->out, HTTP_RESP, rl);
                    c->out_len = rl;
                    c->out_off = 0;
                    memmove(c->in, c->in + used, c->in_len - used);
                    c->in_len -= used;
                    dead = 0;
                }
            }
            /* write what is due */
            while (!dead && (c->out_len || c->bulk_left)) {
                ssize_t w;
                if (c->out_len) {
                    w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
                    if (w > 0) {
                        c->out_off += w;
                        if (c->out_off == c->out_len) c->out_len = c->out_off = 0;
                    }
                } else {
                    long long want = c->bulk_left < (long long)sizeof bulkbuf ? c->bulk_left : (long long)sizeof bulkbuf;
                    w = send(c->fd, bulkbuf, want, MSG_NOSIGNAL);
                    if (w > 0) c->bulk_left -= w;
                }
                if (w < 0) {
                    if (errno != EAGAIN) dead = 1;
                    break;
                }
            }
            if (!dead && !c->out_len && !c->bulk_left && c->close_after) dead = 1;
            if (dead) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                free(c);
                continue;
            }
            struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
            if (c->out_len || c->bulk_left) ev.events = EPOLLOUT;
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* client side: handshakes                                                                    */

static struct sockaddr_in g_proxy, g_origin;
static int g_mode;
static char g_req[512];
static int g_req_len;
static char g_hs1[512];
static int g_hs1_len;

static void build_requests(void) {
    char origin[64];
    snprintf(origin, sizeof origin, "%s:%d", inet_ntoa(g_origin.sin_addr), ntohs(g_origin.sin_port));
    if (g_mode == M_HTTP)
        g_req_len = snprintf(g_req, sizeof g_req,
                             "GET http://%s/ HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", origin, origin);
    else
        g_req_len = snprintf(g_req, sizeof g_req, "GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: loadgen\r\n\r\n", origin);
    if (g_mode == M_CONNECT)
        g_hs1_len = snprintf(g_hs1, sizeof g_hs1, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", origin, origin);
    if (g_mode == M_SOCKS5) {
        memcpy(g_hs1, "\x05\x01\x00", 3);
        g_hs1_len = 3;
    }
}

static void socks5_request(unsigned char *b) {
    b[0] = 5; b[1] = 1; b[2] = 0; b[3] = 1;
    memcpy(b + 4, &g_origin.sin_addr, 4);
    memcpy(b + 8, &g_origin.sin_port, 2);
}

/* bytes needed for a complete SOCKS5 reply in b[0..n), or 0 if unknown yet */
static int socks5_reply_len(const unsigned char *b, int n) {
    if (n < 5) return 0;
    if (b[3] == 1) return 10;
    if (b[3] == 4) return 22;
    if (b[3] == 3) return 7 + b[4];
    return 10;
}

/* HTTP response complete? returns total length or 0 (needs more) or -1 (bad) */
static int http_resp_len(const char *b, int n) {
    const char *end = memmem(b, n, "\r\n\r\n", 4);
    if (!end) return 0;
    int head = end + 4 - b;
    const char *cl = memmem(b, head, "ontent-Length:", 14);
    if (!cl) cl = memmem(b, head, "ontent-length:", 14);
    if (!cl) return -1;
    int body = atoi(cl + 14);
    return head + body <= n ? head + body : 0;
}

/* ------------------------------------------------------------------------------------------ */
/* bulk: one blocking tunnel                                                                  */

static int blocking_handshake(int fd) {
    unsigned char b[1024];
    int n = 0;
    if (g_mode == M_CONNECT) {
        if (send(fd, g_hs1, g_hs1_len, 0) != g_hs1_len) return -1;
        while (!memmem(b, n, "\r\n\r\n", 4)) {
            ssize_t r = recv(fd, b + n, sizeof b - n, 0);
            if (r <= 0) return -1;
            n += r;
        }
        return memcmp(b + 9, "200", 3) ? -1 : 0;
    }
    if (g_mode == M_SOCKS5) {
        if (send(fd, g_hs1, 3, 0) != 3) return -1;
        if (recv(fd, b, 2, MSG_WAITALL) != 2 || b[1] != 0) return -1;
        socks5_request(b);
        if (send(fd, b, 10, 0) != 10) return -1;
        while (n < 5 || n < socks5_reply_len(b, n)) {
            ssize_t r = recv(fd, b + n, sizeof b - n, 0);
            if (r <= 0) return -1;
            n += r;
        }
        return b[1] == 0 ? 0 : -1;
    }
    return 0;
}

static int bulk_main(int argc, char **argv) {
    if (argc < 4) return 2;
    g_mode = mode_of(argv[0]);
    parse_addr(argv[1], &g_proxy);
    parse_addr(argv[2], &g_origin);
    long long total = atoll(argv[3]);
    build_requests();
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in *dst = g_mode == M_DIRECT ? &g_origin : &g_proxy;
    if (connect(fd, (struct sockaddr *)dst, sizeof *dst)) die("bulk connect");
    nodelay(fd);
    if (blocking_handshake(fd)) { fprintf(stderr, "bulk handshake failed\n"); return 1; }
    char req[64];
    int rl = snprintf(req, sizeof req, "BULK %lld\n", total);
    double t0 = now_s();
    if (send(fd, req, rl, 0) != rl) die("bulk send");
    static char buf[1 << 20];
    long long got = 0;
    while (got < total) {
        ssize_t r = recv(fd, buf, sizeof buf, 0);
        if (r <= 0) break;
        got += r;
    }
    double dt = now_s() - t0;
    close(fd);
    printf("{\"bytes\": %lld, \"secs\": %.6f, \"mibps\": %.1f}\n", got, dt, got / dt / 1048576.0);
    return got == total ? 0 : 1;
}

/* ------------------------------------------------------------------------------------------ */
/* short tunnels and idle tunnels: nonblocking state machines                                 */

enum { S_CONNECTING, S_HS1, S_S5REPLY, S_RESP, S_IDLE };
typedef struct {
    int fd;
    int state;
    int slot;
    double t0;
    int n;
    char b[1024];
} cconn;

static int g_ep;
static long long g_err, g_err_connect, g_err_hs, g_err_resp, g_err_timeout;
static double *g_lat;
static long long g_lat_n, g_lat_cap;
static int g_record;

static int start_conn(cconn *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    /* Spread client source addresses over 127.0.0.2-9 so ephemeral ports never run out. */
    struct sockaddr_in src = {.sin_family = AF_INET};
    src.sin_addr.s_addr = htonl(0x7f000002 + (c->slot & 7));
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    bind(fd, (struct sockaddr *)&src, sizeof src);
    nodelay(fd);
    struct sockaddr_in *dst = g_mode == M_DIRECT ? &g_origin : &g_proxy;
    c->fd = fd;
    c->n = 0;
    c->t0 = now_s();
    c->state = S_CONNECTING;
    int r = connect(fd, (struct sockaddr *)dst, sizeof *dst);
    if (r && errno != EINPROGRESS) { close(fd); return -1; }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.ptr = c};
    epoll_ctl(g_ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

static void finish_conn(cconn *c) {
    epoll_ctl(g_ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
}

static int send_all(int fd, const void *p, int n) {
    return send(fd, p, n, MSG_NOSIGNAL) == n ? 0 : -1;
}

/* Advance one connection. Returns 1 when its request completed, -1 on error, 0 otherwise. */
static int step_conn(cconn *c, int idle_mode) {
    if (c->state == S_CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) { g_err_connect++; return -1; }
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
        epoll_ctl(g_ep, EPOLL_CTL_MOD, c->fd, &ev);
        if (g_mode == M_CONNECT || g_mode == M_SOCKS5) {
            if (send_all(c->fd, g_hs1, g_hs1_len)) { g_err_hs++; return -1; }
            c->state = S_HS1;
        } else {
            if (send_all(c->fd, g_req, g_req_len)) { g_err_resp++; return -1; }
            c->state = S_RESP;
        }
        return 0;
    }
    for (;;) {
        if (c->n >= (int)sizeof c->b) { g_err_resp++; return -1; }
        ssize_t r = recv(c->fd, c->b + c->n, sizeof c->b - c->n, 0);
        if (r == 0) {
            if (c->state == S_RESP || c->state == S_IDLE) g_err_resp++; else g_err_hs++;
            return -1;
        }
        if (r < 0) {
            if (errno == EAGAIN) return 0;
            if (c->state == S_RESP || c->state == S_IDLE) g_err_resp++; else g_err_hs++;
            return -1;
        }
        c->n += r;
        if (c->state == S_HS1 && g_mode == M_CONNECT) {
            char *end = memmem(c->b, c->n, "\r\n\r\n", 4);
            if (!end) continue;
            if (c->n < 12 || memcmp(c->b + 9, "200", 3)) { g_err_hs++; return -1; }
            int used = end + 4 - c->b;
            memmove(c->b, c->b + used, c->n - used);
            c->n -= used;
            if (send_all(c->fd, g_req, g_req_len)) { g_err_resp++; return -1; }
            c->state = S_RESP;
        } else if (c->state == S_HS1 && g_mode == M_SOCKS5) {
            if (c->n < 2) continue;
            if (c->b[0] != 5 || c->b[1] != 0) { g_err_hs++; return -1; }
            memmove(c->b, c->b + 2, c->n - 2);
            c->n -= 2;
            unsigned char req[10];
            socks5_request(req);
            if (send_all(c->fd, req, 10)) { g_err_hs++; return -1; }
            c->state = S_S5REPLY;
        } else if (c->state == S_S5REPLY) {
            int need = socks5_reply_len((unsigned char *)c->b, c->n);
            if (!need || c->n < need) continue;
            if (c->b[1] != 0) { g_err_hs++; return -1; }
            memmove(c->b, c->b + need, c->n - need);
            c->n -= need;
            if (send_all(c->fd, g_req, g_req_len)) { g_err_resp++; return -1; }
            c->state = S_RESP;
        }
        if (c->state == S_RESP) {
            int len = http_resp_len(c->b, c->n);
            if (len < 0) { g_err_resp++; return -1; }
            if (len == 0) continue;
            if (idle_mode) { c->state = S_IDLE; c->n = 0; return 1; }
            return 1;
        }
        if (c->state == S_IDLE) { g_err_resp++; return -1; } /* unexpected bytes */
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int short_main(int argc, char **argv) {
    if (argc < 6) return 2;
    g_mode = mode_of(argv[0]);
    parse_addr(argv[1], &g_proxy);
    parse_addr(argv[2], &g_origin);
    int conc = atoi(argv[3]);
    double warm = atof(argv[4]), secs = atof(argv[5]);
    raise_nofile();
    build_requests();
    g_ep = epoll_create1(0);
    g_lat_cap = 8 << 20;
    g_lat = malloc(sizeof(double) * g_lat_cap);
    cconn *cs = calloc(conc, sizeof *cs);
    double start = now_s(), rec_from = start + warm, stop = rec_from + secs;
    for (int i = 0; i < conc; i++) {
        cs[i].slot = i;
        if (start_conn(&cs[i])) g_err_connect++;
    }
    struct epoll_event evs[1024];
    double last_sweep = start;
    long long in_window_ok = 0, total_ok = 0;
    for (;;) {
        double t = now_s();
        if (t >= stop) break;
        if (!g_record && t >= rec_from) {
            g_record = 1;
            g_err = g_err_connect = g_err_hs = g_err_resp = g_err_timeout = 0;
        }
        int n = epoll_wait(g_ep, evs, 1024, 50);
        t = now_s();
        for (int i = 0; i < n; i++) {
            cconn *c = evs[i].data.ptr;
            int r = step_conn(c, 0);
            if (r == 0) continue;
            if (r == 1) total_ok++;
            if (r == 1 && t < stop) {
                if (g_record) {
                    in_window_ok++;
                    if (g_lat_n < g_lat_cap) g_lat[g_lat_n++] = t - c->t0;
                }
            }
            finish_conn(c);
            if (t < stop && start_conn(c)) g_err_connect++;
        }
        if (t - last_sweep > 0.5) { /* per-tunnel timeout: 10 s */
            last_sweep = t;
            for (int i = 0; i < conc; i++)
                if (cs[i].fd >= 0 && t - cs[i].t0 > 10) {
                    g_err_timeout++;
                    finish_conn(&cs[i]);
                    if (start_conn(&cs[i])) g_err_connect++;
                }
        }
    }
    for (int i = 0; i < conc; i++)
        if (cs[i].fd >= 0) finish_conn(&cs[i]);
    qsort(g_lat, g_lat_n, sizeof(double), cmp_double);
    double p50 = g_lat_n ? g_lat[g_lat_n / 2] : 0, p99 = g_lat_n ? g_lat[(long long)(g_lat_n * 0.99)] : 0;
    g_err = g_err_connect + g_err_hs + g_err_resp + g_err_timeout;
    printf("{\"ok\": %lld, \"secs\": %.3f, \"rate\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f, "
           "\"errors\": %lld, \"err_connect\": %lld, \"err_handshake\": %lld, \"err_response\": %lld, "
           "\"err_timeout\": %lld, \"total_ok\": %lld}\n",
           in_window_ok, secs, in_window_ok / secs, p50 * 1e6, p99 * 1e6, g_err, g_err_connect, g_err_hs,
           g_err_resp, g_err_timeout, total_ok);
    return 0;
}

static int idle_main(int argc, char **argv) {
    if (argc < 4) return 2;
    g_mode = mode_of(argv[0]);
    parse_addr(argv[1], &g_proxy);
    parse_addr(argv[2], &g_origin);
    raise_nofile();
    build_requests();
    g_ep = epoll_create1(0);
    int steps[16], nsteps = 0, total = 0;
    char *list = strdup(argv[3]);
    for (char *tok = strtok(list, ","); tok && nsteps < 16; tok = strtok(NULL, ",")) steps[nsteps++] = atoi(tok);
    for (int i = 0; i < nsteps; i++) total = steps[i] > total ? steps[i] : total;
    cconn *cs = calloc(total, sizeof *cs);
    struct epoll_event evs[1024];
    int opened = 0, inflight = 0;
    long long ok = 0;
    for (int s = 0; s < nsteps; s++) {
        /* a tunnel whose handshake never completes (a dropped SYN, a peer that stops
           accepting) must not hold the step for long: give up after 5 s without progress */
        double deadline = now_s() + 60, last_progress = now_s();
        long long seen = -1;
        while ((ok + g_err_connect + g_err_hs + g_err_resp < steps[s]) && now_s() < deadline) {
            long long done = ok + g_err_connect + g_err_hs + g_err_resp;
            if (done != seen) { seen = done; last_progress = now_s(); }
            else if (now_s() - last_progress > 5) break;
            while (opened < steps[s] && inflight < 256) {
                cs[opened].slot = opened;
                if (start_conn(&cs[opened])) g_err_connect++; else inflight++;
                opened++;
            }
            int n = epoll_wait(g_ep, evs, 1024, 100);
            for (int i = 0; i < n; i++) {
                cconn *c = evs[i].data.ptr;
                int was_idle = c->state == S_IDLE;
                int r = step_conn(c, 1);
                if (r == 1) { ok++; inflight--; }
                if (r == -1) { finish_conn(c); if (!was_idle) inflight--; else ok--; }
            }
        }
        long long errs = g_err_connect + g_err_hs + g_err_resp;
        long long stalled = steps[s] - ok - errs;
        printf("STEP %d %lld %lld %lld\n", steps[s], ok, errs, stalled > 0 ? stalled : 0);
        fflush(stdout);
        char line[64];
        if (!fgets(line, sizeof line, stdin)) break;
    }
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_PDEATHSIG, SIGTERM); /* never outlive the harness */
    if (argc < 2) {
        fprintf(stderr, "usage: loadgen origin|bulk|short|idle ...\n");
        return 2;
    }
    if (!strcmp(argv[1], "origin")) return origin_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "bulk")) return bulk_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "short")) return short_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "idle")) return idle_main(argc - 2, argv + 2);
    fprintf(stderr, "unknown command %s\n", argv[1]);
    return 2;
}
