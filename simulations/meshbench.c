/* meshbench: the echo/sink server and the load generator of simulations/bench_proxy.py.
 *
 * One epoll thread each, non-blocking sockets, no allocation on the hot path: far cheaper
 * per byte and per request than any proxy it measures (the "direct" column shows its ceiling).
 *
 *   meshbench server PORT
 *       Each connection's first byte picks its mode: 'E' echoes every later byte back
 *       (half-close answered by half-close); 'S' is a sink: it counts bytes until EOF,
 *       then answers the count as 8 bytes big-endian and closes.
 *   meshbench bulk PORT BYTES
 *       One connection: 'S', then BYTES streamed one way, then EOF; the clock stops when
 *       the sink's count arrives (so every byte reached the server).
 *   meshbench rr PORT CONC SECONDS SIZE WARMUP
 *       CONC connections in echo mode, each a closed loop of SIZE-byte request and SIZE-byte
 *       response; WARMUP seconds unrecorded, then SECONDS recorded (latency of each exchange).
 *   meshbench conn PORT CONC SECONDS SIZE WARMUP
 *       CONC slots, each a loop of: connect, 'E' + SIZE bytes, read SIZE bytes back, close.
 *       The latency is from connect() to the whole answer.
 * Clients print one JSON object on stdout.
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
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUFSZ (256 * 1024)
static char buf[BUFSZ];

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "meshbench: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

/* ------------------------------------------------------------------ server */

enum { M_NEW, M_ECHO, M_SINK };

struct sconn {
    int fd, mode;
    uint64_t count;
    char *pend; /* echo bytes the socket would not take yet */
    size_t plen, poff;
};

static void sclose(int ep, struct sconn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->pend);
    free(c);
}

/* Write what is pending; returns 1 when all is out, 0 when the socket is full, -1 on error. */
static int sflush(struct sconn *c) {
    while (c->poff < c->plen) {
        ssize_t n = send(c->fd, c->pend + c->poff, c->plen - c->poff, MSG_NOSIGNAL);
        if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        c->poff += (size_t)n;
    }
    c->plen = c->poff = 0;
    return 1;
}

static void sinterest(int ep, struct sconn *c, uint32_t ev) {
    struct epoll_event e = {.events = ev, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void server_event(int ep, struct sconn *c, uint32_t ev) {
    if (c->plen) { /* waiting for room to echo */
        int r = sflush(c);
        if (r < 0) { sclose(ep, c); return; }
        if (r == 0) return;
        sinterest(ep, c, EPOLLIN);
        return;
    }
    (void)ev;
    for (int rounds = 0; rounds < 16; rounds++) {
        ssize_t n = recv(c->fd, buf, BUFSZ, 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            sclose(ep, c);
            return;
        }
        if (n == 0) {
            if (c->mode == M_SINK) {
                unsigned char out[8];
                for (int i = 0; i < 8; i++) out[i] = (unsigned char)(c->count >> (56 - 8 * i));
                send(c->fd, out, 8, MSG_NOSIGNAL); /* an empty socket always takes 8 bytes */
            }
            shutdown(c->fd, SHUT_WR);
            sclose(ep, c);
            return;
        }
        char *p = buf;
        if (c->mode == M_NEW) {
            c->mode = p[0] == 'S' ? M_SINK : M_ECHO;
            p++;
            n--;
        }
        if (c->mode == M_SINK) {
            c->count += (uint64_t)n;
            continue;
        }
        size_t off = 0;
        while (off < (size_t)n) {
            ssize_t w = send(c->fd, p + off, (size_t)n - off, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK) break;
                sclose(ep, c);
                return;
            }
            off += (size_t)w;
        }
        if (off < (size_t)n) {
            c->pend = realloc(c->pend, (size_t)n - off);
            memcpy(c->pend, p + off, (size_t)n - off);
            c->plen = (size_t)n - off;
            c->poff = 0;
            sinterest(ep, c, EPOLLOUT);
            return;
        }
        if ((size_t)n < BUFSZ) return; /* drained for now: level-triggered epoll calls again */
    }
}

static int run_server(int port) {
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = loopback(port);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    nonblock(ls);
    int ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &e);
    struct epoll_event evs[256];
    for (;;) {
        int k = epoll_wait(ep, evs, 256, -1);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < k; i++) {
            if (evs[i].data.ptr == NULL) {
                for (;;) {
                    int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    nodelay(fd);
                    struct sconn *c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event ce = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ce);
                }
            } else {
                server_event(ep, evs[i].data.ptr, evs[i].events);
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ clients */

struct lat {
    uint64_t *v;
    size_t n, cap;
};

static void lat_add(struct lat *l, uint64_t ns) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 65536;
        l->v = realloc(l->v, l->cap * sizeof *l->v);
    }
    l->v[l->n++] = ns;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(struct lat *l, double p) { /* nearest rank, in microseconds */
    if (!l->n) return -1;
    size_t i = (size_t)(p * (double)l->n + 0.999999);
    if (i < 1) i = 1;
    if (i > l->n) i = l->n;
    return (double)l->v[i - 1] / 1000.0;
}

static int connect_blocking(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = loopback(port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    return fd;
}

static int run_bulk(int port, uint64_t total) {
    memset(buf, 'x', BUFSZ);
    uint64_t t0 = now_ns();
    int fd = connect_blocking(port);
    if (send(fd, "S", 1, MSG_NOSIGNAL) != 1) die("send");
    uint64_t left = total;
    while (left) {
        size_t chunk = left < BUFSZ ? (size_t)left : BUFSZ;
        ssize_t n = send(fd, buf, chunk, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            printf("{\"ok\": false, \"error\": \"send: %s\", \"sent\": %llu}\n", strerror(errno),
                   (unsigned long long)(total - left));
            return 1;
        }
        left -= (uint64_t)n;
    }
    shutdown(fd, SHUT_WR);
    unsigned char ack[8];
    size_t got = 0;
    while (got < 8) {
        ssize_t n = recv(fd, ack + got, 8 - got, 0);
        if (n <= 0) {
            printf("{\"ok\": false, \"error\": \"no count from the sink (%s)\"}\n", n == 0 ? "EOF" : strerror(errno));
            return 1;
        }
        got += (size_t)n;
    }
    uint64_t t1 = now_ns();
    uint64_t count = 0;
    for (int i = 0; i < 8; i++) count = (count << 8) | ack[i];
    close(fd);
    printf("{\"ok\": %s, \"bytes\": %llu, \"received\": %llu, \"seconds\": %.6f}\n", count == total ? "true" : "false",
           (unsigned long long)total, (unsigned long long)count, (double)(t1 - t0) / 1e9);
    return 0;
}

struct cconn {
    int fd, slot, state; /* conn mode: 0 connecting, 1 sending, 2 receiving */
    size_t off, got, want;
    uint64_t t0;
};

static char reqbuf[1 << 20];

static void print_result(const char *what, uint64_t count, double secs, struct lat *l, uint64_t errors,
                         const char *first_error) {
    qsort(l->v, l->n, sizeof *l->v, cmp_u64);
    printf("{\"ok\": true, \"%s\": %llu, \"seconds\": %.6f, \"rate\": %.1f, \"p50_us\": %.1f, \"p90_us\": %.1f, "
           "\"p99_us\": %.1f, \"max_us\": %.1f, \"errors\": %llu, \"first_error\": \"%s\"}\n",
           what, (unsigned long long)count, secs, (double)count / secs, pct(l, 0.50), pct(l, 0.90), pct(l, 0.99),
           l->n ? (double)l->v[l->n - 1] / 1000.0 : -1.0, (unsigned long long)errors, first_error);
}

/* Send from reqbuf[off..want); returns 1 done, 0 would block, -1 error. */
static int csend(struct cconn *c) {
    while (c->off < c->want) {
        ssize_t n = send(c->fd, reqbuf + c->off, c->want - c->off, MSG_NOSIGNAL);
        if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        c->off += (size_t)n;
    }
    return 1;
}

static char first_error[128] = "";
static void note_error(const char *what, int err) {
    if (!first_error[0]) snprintf(first_error, sizeof first_error, "%s: %s", what, err ? strerror(err) : "EOF");
}

static int run_rr(int port, int conc, double secs, size_t size, double warmup) {
    if (size > sizeof reqbuf) size = sizeof reqbuf;
    memset(reqbuf, 'r', sizeof reqbuf);
    int ep = epoll_create1(0);
    struct cconn *cs = calloc((size_t)conc, sizeof *cs);
    struct lat l = {0};
    uint64_t errors = 0, done = 0;
    int alive = conc;
    for (int i = 0; i < conc; i++) {
        struct cconn *c = &cs[i];
        c->fd = connect_blocking(port);
        nodelay(c->fd);
        if (send(c->fd, "E", 1, MSG_NOSIGNAL) != 1) die("send");
        nonblock(c->fd);
        struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e);
    }
    uint64_t start = now_ns();
    uint64_t rec_from = start + (uint64_t)(warmup * 1e9), until = rec_from + (uint64_t)(secs * 1e9);
    for (int i = 0; i < conc; i++) {
        struct cconn *c = &cs[i];
        c->t0 = now_ns();
        c->off = 0;
        c->got = 0;
        c->want = size;
        int r = csend(c);
        if (r < 0) die("send");
        c->state = r ? 2 : 1;
        if (!r) {
            struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
        }
    }
    struct epoll_event evs[64];
    uint64_t t = now_ns();
    while (t < until && alive > 0) {
        int k = epoll_wait(ep, evs, 64, 100);
        t = now_ns();
        for (int i = 0; i < k; i++) {
            struct cconn *c = evs[i].data.ptr;
            if (c->state == 1) {
                int r = csend(c);
                if (r < 0) goto fail;
                if (r == 0) continue;
                c->state = 2;
                struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                continue;
            }
            for (;;) {
                ssize_t n = recv(c->fd, buf, size - c->got, 0);
                if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
                if (n <= 0) {
                    note_error("rr recv", n < 0 ? errno : 0);
                    goto fail;
                }
                c->got += (size_t)n;
                if (c->got < size) continue;
                t = now_ns();
                if (c->t0 >= rec_from && t <= until) {
                    lat_add(&l, t - c->t0);
                    done++;
                }
                c->got = 0;
                c->off = 0;
                c->want = size;
                c->t0 = t;
                int r = csend(c);
                if (r < 0) goto fail;
                if (r == 0) {
                    c->state = 1;
                    struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                }
                break;
            }
            continue;
        fail:
            if (!first_error[0]) note_error("rr send", errno);
            errors++;
            alive--;
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->fd = -1;
        }
    }
    double measured = (double)((t < until ? t : until) - rec_from) / 1e9;
    if (measured <= 0) measured = 1e-9;
    print_result("requests", done, measured, &l, errors, first_error);
    return 0;
}

static int conn_start(int ep, struct cconn *c, int port, size_t size) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) die("socket");
    nodelay(c->fd);
    struct sockaddr_in a = loopback(port);
    c->t0 = now_ns();
    c->state = 0;
    c->got = 0;
    c->off = 0;
    c->want = size + 1;
    int r = connect(c->fd, (struct sockaddr *)&a, sizeof a);
    if (r < 0 && errno != EINPROGRESS) {
        note_error("connect", errno);
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e);
    return 0;
}

static int run_conn(int port, int conc, double secs, size_t size, double warmup) {
    memset(reqbuf, 'c', sizeof reqbuf);
    reqbuf[0] = 'E';
    int ep = epoll_create1(0);
    struct cconn *cs = calloc((size_t)conc, sizeof *cs);
    struct lat l = {0};
    uint64_t errors = 0, done = 0;
    uint64_t start = now_ns();
    uint64_t rec_from = start + (uint64_t)(warmup * 1e9), until = rec_from + (uint64_t)(secs * 1e9);
    for (int i = 0; i < conc; i++) {
        cs[i].slot = i;
        while (conn_start(ep, &cs[i], port, size) < 0) {
            if (++errors > 1000) die("connect keeps failing");
            usleep(1000);
        }
    }
    struct epoll_event evs[64];
    uint64_t t = now_ns();
    while (t < until) {
        int k = epoll_wait(ep, evs, 64, 100);
        t = now_ns();
        for (int i = 0; i < k; i++) {
            struct cconn *c = evs[i].data.ptr;
            int failed = 0, finished = 0;
            if (c->state == 0) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    note_error("connect", err);
                    failed = 1;
                } else {
                    c->state = 1;
                }
            }
            if (!failed && c->state == 1) {
                int r = csend(c);
                if (r < 0) {
                    note_error("conn send", errno);
                    failed = 1;
                } else if (r == 1) {
                    c->state = 2;
                    struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                    continue; /* the answer cannot be here yet */
                }
            }
            if (!failed && c->state == 2) {
                for (;;) {
                    ssize_t n = recv(c->fd, buf, size - c->got, 0);
                    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
                    if (n <= 0) {
                        note_error("conn recv", n < 0 ? errno : 0);
                        failed = 1;
                        break;
                    }
                    c->got += (size_t)n;
                    if (c->got == size) {
                        finished = 1;
                        break;
                    }
                }
            }
            if (!failed && !finished) continue;
            t = now_ns();
            if (finished && c->t0 >= rec_from && t <= until) {
                lat_add(&l, t - c->t0);
                done++;
            }
            if (failed && t >= rec_from) errors++;
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->fd = -1;
            if (t >= until) continue;
            int tries = 0;
            while (conn_start(ep, c, port, size) < 0) {
                errors++;
                if (++tries > 1000) die("connect keeps failing");
                usleep(1000);
            }
        }
    }
    double measured = (double)(until - rec_from) / 1e9;
    print_result("connections", done, measured, &l, errors, first_error);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 3 && !strcmp(argv[1], "server")) return run_server(atoi(argv[2]));
    if (argc >= 4 && !strcmp(argv[1], "bulk")) return run_bulk(atoi(argv[2]), strtoull(argv[3], NULL, 10));
    if (argc >= 7 && !strcmp(argv[1], "rr"))
        return run_rr(atoi(argv[2]), atoi(argv[3]), atof(argv[4]), (size_t)atol(argv[5]), atof(argv[6]));
    if (argc >= 7 && !strcmp(argv[1], "conn"))
        return run_conn(atoi(argv[2]), atoi(argv[3]), atof(argv[4]), (size_t)atol(argv[5]), atof(argv[6]));
    fprintf(stderr, "usage: meshbench server PORT | bulk PORT BYTES | rr PORT CONC SECONDS SIZE WARMUP | "
                    "conn PORT CONC SECONDS SIZE WARMUP\n");
    return 2;
}
