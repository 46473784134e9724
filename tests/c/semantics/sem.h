/* Shared helpers of the socket-semantics programs (tests/semantics.rs).
 *
 * Every program prints what it observed, one fact a line, never ports, pids or timings, so
 * that its run over kernel TCP and its run over SDP can be compared byte for byte. At
 * `sync_point()` it prints "SYNC" and waits for a byte on stdin while its connections are
 * open and have carried data: the harness reads `sdp stat --json` there. A failed
 * precondition exits 2 with the reason on stderr. */
#ifndef SEM_H
#define SEM_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHECK(x)                                                                          \
    do {                                                                                  \
        if (!(x)) {                                                                       \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, strerror(errno)); \
            exit(2);                                                                      \
        }                                                                                 \
    } while (0)

static const char *en(int e) {
    switch (e) {
    case 0: return "0";
    case EAGAIN: return "EAGAIN";
    case EINTR: return "EINTR";
    case EPIPE: return "EPIPE";
    case ECONNRESET: return "ECONNRESET";
    case ECONNREFUSED: return "ECONNREFUSED";
    case EINPROGRESS: return "EINPROGRESS";
    case EINVAL: return "EINVAL";
    case EBADF: return "EBADF";
    case ENOTCONN: return "ENOTCONN";
    case EISCONN: return "EISCONN";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EEXIST: return "EEXIST";
    default: return strerror(e);
    }
}

/* "-1 EAGAIN" or the count. */
static const char *res(long n) {
    static char buf[8][64];
    static int i;
    char *b = buf[i++ % 8];
    if (n < 0)
        snprintf(b, 64, "-1 %s", en(errno));
    else
        snprintf(b, 64, "%ld", n);
    return b;
}

static const char *pollstr(int r) {
    static char buf[4][96];
    static int i;
    char *b = buf[i++ % 4];
    b[0] = 0;
    if (r & POLLIN) strcat(b, "IN ");
    if (r & POLLPRI) strcat(b, "PRI ");
    if (r & POLLOUT) strcat(b, "OUT ");
    if (r & POLLRDHUP) strcat(b, "RDHUP ");
    if (r & POLLERR) strcat(b, "ERR ");
    if (r & POLLHUP) strcat(b, "HUP ");
    if (r & POLLNVAL) strcat(b, "NVAL ");
    if (!b[0]) strcat(b, "none ");
    b[strlen(b) - 1] = 0;
    return b;
}

static inline int poll1(int fd, short events, int ms) {
    struct pollfd p = {.fd = fd, .events = events};
    int n = poll(&p, 1, ms);
    CHECK(n >= 0);
    return n ? p.revents : 0;
}

static struct sockaddr_in listen_addr;

static inline int listener_on(int family, uint16_t port) {
    int l = socket(family, SOCK_STREAM, 0);
    CHECK(l >= 0);
    int one = 1;
    CHECK(setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(bind(l, (struct sockaddr *)&a, sizeof a) == 0);
    CHECK(listen(l, 256) == 0);
    socklen_t len = sizeof listen_addr;
    CHECK(getsockname(l, (struct sockaddr *)&listen_addr, &len) == 0);
    return l;
}

static inline int listener(void) { return listener_on(AF_INET, 0); }

static inline int connect_family(int family, const struct sockaddr_in *a) {
    int c = socket(family, SOCK_STREAM, 0);
    CHECK(c >= 0);
    CHECK(connect(c, (const struct sockaddr *)a, sizeof *a) == 0);
    return c;
}

static inline int connect_to(const struct sockaddr_in *a) { return connect_family(AF_INET, a); }

/* A connected pair in this process: connect to our own listener, then accept. */
static inline void pair_on(int l, int *c, int *s) {
    *c = connect_to(&listen_addr);
    *s = accept(l, NULL, NULL);
    CHECK(*s >= 0);
}

static inline void write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        CHECK(n > 0);
        p += n;
        len -= (size_t)n;
    }
}

static inline void read_all(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        CHECK(n > 0);
        p += n;
        len -= (size_t)n;
    }
}

/* One message each way, so that both ends have carried bytes. */
static inline void exchange(int c, int s) {
    char b[5];
    write_all(c, "ping", 4);
    read_all(s, b, 4);
    write_all(s, "pong", 4);
    read_all(c, b, 4);
}

/* One connected, exchanged pair on a fresh listener. */
static inline void fresh_pair(int *c, int *s) {
    int l = listener();
    pair_on(l, c, s);
    close(l);
    exchange(*c, *s);
}

static inline void sync_point(void) {
    printf("SYNC\n");
    fflush(stdout);
    char b;
    ssize_t n;
    do n = read(0, &b, 1);
    while (n < 0 && errno == EINTR);
}

static inline double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* Sends `len`-byte chunks on `fd`, non-blocking, until the connection takes no more (EAGAIN);
 * returns the bytes taken. The fd's blocking mode is restored. */
static inline size_t fill_until_eagain(int fd, const char *chunk, size_t len) {
    int fl = fcntl(fd, F_GETFL);
    CHECK(fcntl(fd, F_SETFL, fl | O_NONBLOCK) == 0);
    size_t taken = 0;
    for (;;) {
        ssize_t n = send(fd, chunk, len, 0);
        if (n < 0) {
            CHECK(errno == EAGAIN);
            break;
        }
        taken += (size_t)n;
    }
    CHECK(fcntl(fd, F_SETFL, fl) == 0);
    return taken;
}

/* Reads `fd` until end of stream; returns the bytes read. */
static inline size_t read_to_eof(int fd) {
    char b[65536];
    size_t got = 0;
    for (;;) {
        ssize_t n = read(fd, b, sizeof b);
        CHECK(n >= 0);
        if (n == 0) return got;
        got += (size_t)n;
    }
}

static inline void sleep_ms(int ms) {
    struct timespec t = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000};
    while (nanosleep(&t, &t) && errno == EINTR) {
    }
}

/* Runs `fn(arg)` in a new thread. */
static inline pthread_t spawn(void *(*fn)(void *), void *arg) {
    pthread_t t;
    CHECK(pthread_create(&t, NULL, fn, arg) == 0);
    return t;
}

struct delayed_write {
    int fd;
    int ms;
    const char *data;
};

static inline void *delayed_write_fn(void *p) {
    struct delayed_write *d = p;
    sleep_ms(d->ms);
    write_all(d->fd, d->data, strlen(d->data));
    return NULL;
}

typedef void (*case_fn)(void);
struct sem_case {
    const char *name;
    case_fn fn;
};

static inline int run_case(const struct sem_case *cases, int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2) {
        fprintf(stderr, "usage: %s CASE\n", argv[0]);
        return 2;
    }
    for (const struct sem_case *k = cases; k->name; k++)
        if (!strcmp(k->name, argv[1])) {
            k->fn();
            return 0;
        }
    fprintf(stderr, "no case %s\n", argv[1]);
    return 2;
}

#endif
