/* Readiness and blocking: select, pselect, poll, ppoll, epoll (level, edge, oneshot,
 * exclusive, nested), blocking read/write, SO_RCVTIMEO/SO_SNDTIMEO, EINTR and SA_RESTART. */
#include "sem.h"
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/select.h>

static int C, S;

static void sel_report(const char *what, int n, fd_set *r, fd_set *w) {
    printf("%s: %d read(c)=%d read(s)=%d write(c)=%d write(s)=%d\n", what, n, FD_ISSET(C, r) != 0,
           FD_ISSET(S, r) != 0, FD_ISSET(C, w) != 0, FD_ISSET(S, w) != 0);
}

static int do_select(int use_pselect, int ms) {
    fd_set r, w;
    FD_ZERO(&r);
    FD_ZERO(&w);
    FD_SET(C, &r);
    FD_SET(S, &r);
    FD_SET(C, &w);
    FD_SET(S, &w);
    int nfds = (C > S ? C : S) + 1;
    int n;
    if (use_pselect) {
        struct timespec t = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000};
        sigset_t m;
        sigemptyset(&m);
        n = pselect(nfds, &r, &w, NULL, &t, &m);
    } else {
        struct timeval t = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
        n = select(nfds, &r, &w, NULL, &t);
    }
    CHECK(n >= 0);
    sel_report(use_pselect ? "pselect" : "select", n, &r, &w);
    return n;
}

static void selects(int ps) {
    fresh_pair(&C, &S);
    do_select(ps, 0);
    write_all(C, "abc", 3);
    do_select(ps, 1000);
    char b[8];
    printf("read: %s\n", res(read(S, b, sizeof b)));
    do_select(ps, 0);
    /* Blocking until data comes from another thread, only read sets. */
    struct delayed_write d = {.fd = S, .ms = 100, .data = "late"};
    pthread_t t = spawn(delayed_write_fn, &d);
    fd_set r;
    FD_ZERO(&r);
    FD_SET(C, &r);
    int n = ps ? pselect(C + 1, &r, NULL, NULL, NULL, NULL) : select(C + 1, &r, NULL, NULL, NULL);
    printf("blocking wait: %d read(c)=%d\n", n, FD_ISSET(C, &r) != 0);
    pthread_join(t, NULL);
    printf("read: %s\n", res(read(C, b, sizeof b)));
    sync_point();
    shutdown(C, SHUT_WR);
    do_select(ps, 1000);
    printf("read at eof: %s\n", res(read(S, b, sizeof b)));
}

static void c_select(void) { selects(0); }
static void c_pselect(void) { selects(1); }

static void polls(int pp) {
    fresh_pair(&C, &S);
    const char *name = pp ? "ppoll" : "poll";
    for (int step = 0; step < 4; step++) {
        if (step == 1) write_all(C, "abc", 3);
        if (step == 2) {
            char b[8];
            printf("read: %s\n", res(read(S, b, sizeof b)));
        }
        if (step == 3) shutdown(C, SHUT_WR);
        struct pollfd p[2] = {{.fd = C, .events = POLLIN | POLLOUT | POLLRDHUP},
                              {.fd = S, .events = POLLIN | POLLOUT | POLLRDHUP}};
        int n;
        if (pp) {
            struct timespec t = {.tv_sec = 1};
            sigset_t m;
            sigemptyset(&m);
            n = ppoll(p, 2, step == 0 || step == 2 ? &(struct timespec){0} : &t, &m);
        } else {
            n = poll(p, 2, step == 0 || step == 2 ? 0 : 1000);
        }
        CHECK(n >= 0);
        printf("%s step %d: %d c=%s s=%s\n", name, step, n, pollstr(p[0].revents), pollstr(p[1].revents));
        if (step == 1) sync_point();
    }
    /* Blocking wait woken by data from another thread. */
    struct delayed_write d = {.fd = S, .ms = 100, .data = "late"};
    pthread_t t = spawn(delayed_write_fn, &d);
    struct pollfd p = {.fd = C, .events = POLLIN};
    int n = pp ? ppoll(&p, 1, NULL, NULL) : poll(&p, 1, -1);
    printf("%s blocking: %d %s\n", name, n, pollstr(p.revents));
    pthread_join(t, NULL);
    /* No events asked: only HUP/ERR would show. */
    struct pollfd z = {.fd = S, .events = 0};
    printf("%s no events: %d\n", name, poll(&z, 1, 0));
}

static void c_poll(void) { polls(0); }
static void c_ppoll(void) { polls(1); }

static int ewait(int ep, int ms) {
    struct epoll_event ev[4];
    int n = epoll_wait(ep, ev, 4, ms);
    CHECK(n >= 0);
    return n;
}

static void c_epoll_lt(void) {
    fresh_pair(&C, &S);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    CHECK(ep >= 0);
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = 42};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, S, &e) == 0);
    printf("idle: %d\n", ewait(ep, 0));
    write_all(C, "abcdef", 6);
    struct epoll_event got;
    int n = epoll_wait(ep, &got, 1, 1000);
    printf("after write: %d data=%llu events=%s\n", n, (unsigned long long)got.data.u64, pollstr(got.events));
    printf("again (level): %d\n", ewait(ep, 0));
    char b[8];
    printf("read 2: %s\n", res(read(S, b, 2)));
    printf("still (level): %d\n", ewait(ep, 0));
    sync_point();
    printf("read rest: %s\n", res(read(S, b, sizeof b)));
    printf("drained: %d\n", ewait(ep, 0));
    e.events = EPOLLOUT;
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, S, &e) == 0);
    n = epoll_wait(ep, &got, 1, 1000);
    printf("EPOLLOUT: %d events=%s\n", n, pollstr(got.events));
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, S, NULL) == 0);
    printf("after DEL: %d\n", ewait(ep, 0));
    errno = 0;
    int r = epoll_ctl(ep, EPOLL_CTL_DEL, S, NULL);
    printf("DEL again: %d %s\n", r, r < 0 && errno == ENOENT ? "ENOENT" : en(errno));
}

static void c_epoll_et(void) {
    fresh_pair(&C, &S);
    int ep = epoll_create1(0);
    CHECK(ep >= 0);
    struct epoll_event e = {.events = EPOLLIN | EPOLLET | EPOLLRDHUP, .data.fd = S};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, S, &e) == 0);
    printf("idle: %d\n", ewait(ep, 0));
    write_all(C, "abc", 3);
    printf("first arrival: %d\n", ewait(ep, 1000));
    printf("no new edge: %d\n", ewait(ep, 0));
    char b[8];
    printf("read 1: %s\n", res(read(S, b, 1)));
    printf("partial read, no edge: %d\n", ewait(ep, 0));
    write_all(C, "de", 2);
    printf("second arrival without draining: %d\n", ewait(ep, 1000));
    sync_point();
    printf("read: %s\n", res(read(S, b, sizeof b)));
    printf("read until EAGAIN: %s\n", res(recv(S, b, sizeof b, MSG_DONTWAIT)));
    printf("after drain: %d\n", ewait(ep, 0));
    shutdown(C, SHUT_WR);
    struct epoll_event got;
    int n = epoll_wait(ep, &got, 1, 1000);
    printf("peer shutdown: %d %s\n", n, pollstr(got.events));
    printf("then: %d\n", ewait(ep, 0));
}

static void c_epoll_oneshot(void) {
    fresh_pair(&C, &S);
    int ep = epoll_create1(0);
    CHECK(ep >= 0);
    struct epoll_event e = {.events = EPOLLIN | EPOLLONESHOT, .data.fd = S};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, S, &e) == 0);
    write_all(C, "a", 1);
    printf("first: %d\n", ewait(ep, 1000));
    printf("disarmed: %d\n", ewait(ep, 0));
    write_all(C, "b", 1);
    printf("disarmed after more data: %d\n", ewait(ep, 100));
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, S, &e) == 0);
    printf("rearmed: %d\n", ewait(ep, 1000));
    printf("disarmed again: %d\n", ewait(ep, 0));
    sync_point();
    char b[8];
    printf("read: %s\n", res(read(S, b, sizeof b)));
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, S, &e) == 0);
    printf("rearmed, no data: %d\n", ewait(ep, 0));
}

struct waiter {
    int ep;
    int n;
};

static void *wait_fn(void *p) {
    struct waiter *w = p;
    struct epoll_event ev;
    w->n = epoll_wait(w->ep, &ev, 1, 500);
    return NULL;
}

static void c_epoll_exclusive(void) {
    fresh_pair(&C, &S);
    int ep1 = epoll_create1(0), ep2 = epoll_create1(0);
    CHECK(ep1 >= 0 && ep2 >= 0);
    struct epoll_event e = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.fd = S};
    printf("add exclusive 1: %d\n", epoll_ctl(ep1, EPOLL_CTL_ADD, S, &e));
    printf("add exclusive 2: %d\n", epoll_ctl(ep2, EPOLL_CTL_ADD, S, &e));
    errno = 0;
    int r = epoll_ctl(ep1, EPOLL_CTL_MOD, S, &e);
    printf("MOD exclusive: %d %s\n", r, en(errno));
    struct waiter w1 = {.ep = ep1}, w2 = {.ep = ep2};
    pthread_t t1 = spawn(wait_fn, &w1), t2 = spawn(wait_fn, &w2);
    sleep_ms(100);
    write_all(C, "x", 1);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    printf("woken: %d\n", (w1.n > 0) + (w2.n > 0) > 0);
    /* Which waiter woke is the kernel's choice; the woken one's entry stays ready. */
    printf("level after wakeup: %d\n", ewait(ep1, 0) + ewait(ep2, 0) >= 1);
    sync_point();
    char b[4];
    printf("read: %s\n", res(read(S, b, sizeof b)));
    printf("drained: %d %d\n", ewait(ep1, 0), ewait(ep2, 0));
}

static void c_epoll_nested(void) {
    fresh_pair(&C, &S);
    int inner = epoll_create1(0), outer = epoll_create1(0);
    CHECK(inner >= 0 && outer >= 0);
    struct epoll_event e = {.events = EPOLLIN, .data.fd = S};
    CHECK(epoll_ctl(inner, EPOLL_CTL_ADD, S, &e) == 0);
    struct epoll_event o = {.events = EPOLLIN, .data.fd = inner};
    CHECK(epoll_ctl(outer, EPOLL_CTL_ADD, inner, &o) == 0);
    printf("idle: outer %d inner %d\n", ewait(outer, 0), ewait(inner, 0));
    write_all(C, "abc", 3);
    struct epoll_event got;
    int n = epoll_wait(outer, &got, 1, 1000);
    printf("outer: %d is inner=%d\n", n, got.data.fd == inner);
    n = epoll_wait(inner, &got, 1, 0);
    printf("inner: %d is s=%d\n", n, got.data.fd == S);
    sync_point();
    struct pollfd p = {.fd = outer, .events = POLLIN};
    printf("poll on outer: %d\n", poll(&p, 1, 0));
    char b[8];
    printf("read: %s\n", res(read(S, b, sizeof b)));
    printf("drained: outer %d inner %d\n", ewait(outer, 0), ewait(inner, 0));
}

struct dwait {
    int ep;
    int ms;
    int n;
};

static void *dwait_fn(void *p) {
    struct dwait *w = p;
    struct epoll_event ev;
    w->n = epoll_wait(w->ep, &ev, 1, w->ms);
    return NULL;
}

/* The event-loop pattern of redis-benchmark and hiredis: a connection deleted from the set
 * and added back with other events around every message, identical MODs, and a DEL that must
 * hold at once for another thread, a fork child and a closed descriptor. */
static void c_epoll_reregister(void) {
    fresh_pair(&C, &S);
    int ep = epoll_create1(0);
    CHECK(ep >= 0);
    struct epoll_event e = {.events = EPOLLIN, .data.fd = S};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, S, &e) == 0);
    write_all(C, "abc", 3);
    printf("readable: %d\n", ewait(ep, 1000));
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, S, NULL) == 0);
    printf("after DEL: %d\n", ewait(ep, 0));
    errno = 0;
    int r = epoll_ctl(ep, EPOLL_CTL_MOD, S, &e);
    printf("MOD after DEL: %d %s\n", r, en(errno));
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, S, NULL) < 0);
    e.events = EPOLLOUT;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, S, &e) == 0);
    struct epoll_event got;
    int n = epoll_wait(ep, &got, 1, 1000);
    printf("added back for OUT: %d %s\n", n, pollstr(got.events));
    errno = 0;
    r = epoll_ctl(ep, EPOLL_CTL_ADD, S, &e);
    printf("ADD twice: %d %s\n", r, en(errno));
    for (int i = 0; i < 3; i++) {
        CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, S, &e) == 0);
    }
    n = epoll_wait(ep, &got, 1, 0);
    printf("after identical MODs: %d %s\n", n, pollstr(got.events));
    /* DEL + ADD(IN) many times, as an event loop does: always the same answer. */
    int same = 1;
    for (int i = 0; i < 100; i++) {
        CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, S, NULL) == 0);
        e.events = (i & 1) ? EPOLLOUT : EPOLLIN;
        CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, S, &e) == 0);
        n = epoll_wait(ep, &got, 1, 0);
        same &= n == 1 && got.events == e.events;
    }
    printf("100 DEL+ADD: %s\n", same ? "same answers" : "different");
    /* A DEL, then another thread waits: nothing for the deleted fd. */
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, S, NULL) == 0);
    struct dwait w = {.ep = ep, .ms = 100};
    pthread_t t = spawn(dwait_fn, &w);
    pthread_join(t, NULL);
    printf("other thread after DEL: %d\n", w.n);
    /* A thread waiting while this one deletes, then data: nothing. */
    e.events = EPOLLIN;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, S, &e) == 0);
    char b[8];
    printf("read: %s\n", res(read(S, b, sizeof b)));
    struct dwait w2 = {.ep = ep, .ms = 300};
    t = spawn(dwait_fn, &w2);
    sleep_ms(50);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, S, NULL) == 0);
    write_all(C, "x", 1);
    pthread_join(t, NULL);
    printf("waiter while deleting, then data: %d\n", w2.n);
    /* A DEL, then fork: the child's wait on the shared set finds nothing. */
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, S, &e) == 0);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, S, NULL) == 0);
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        printf("child after DEL: %d\n", ewait(ep, 100));
        fflush(stdout);
        _exit(0);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    /* A DEL, then a close of another descriptor of the same socket: nothing either. */
    int d = dup(S);
    CHECK(d >= 0);
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, d, &e) == 0);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, d, NULL) == 0);
    CHECK(close(d) == 0);
    printf("after DEL and close of a dup: %d\n", ewait(ep, 0));
    sync_point();
    printf("read: %s\n", res(read(S, b, sizeof b)));
}

struct reader {
    int fd;
    size_t want;
    unsigned long sum;
    size_t got;
};

static void *reader_fn(void *p) {
    struct reader *r = p;
    static char buf[65536];
    sleep_ms(200);
    while (r->got < r->want) {
        ssize_t n = read(r->fd, buf, sizeof buf);
        CHECK(n > 0);
        for (ssize_t i = 0; i < n; i++) r->sum += (unsigned char)buf[i];
        r->got += (size_t)n;
    }
    return NULL;
}

static void c_blocking(void) {
    fresh_pair(&C, &S);
    char b[16];
    struct delayed_write d = {.fd = C, .ms = 150, .data = "later"};
    pthread_t t = spawn(delayed_write_fn, &d);
    double t0 = now_ms();
    ssize_t n = read(S, b, sizeof b);
    printf("blocking read: %s waited=%d\n", res(n), now_ms() - t0 >= 100);
    pthread_join(t, NULL);
    /* A write larger than every buffer blocks until the reader drains it. */
    size_t big = 8 << 20;
    char *buf = malloc(big);
    CHECK(buf);
    unsigned long sum = 0;
    for (size_t i = 0; i < big; i++) sum += (unsigned char)(buf[i] = (char)(i * 7));
    struct reader r = {.fd = S, .want = big};
    t = spawn(reader_fn, &r);
    t0 = now_ms();
    n = write(C, buf, big);
    printf("blocking write: %s blocked=%d\n", res(n), now_ms() - t0 >= 100);
    pthread_join(t, NULL);
    printf("reader got: %zu sum ok=%d\n", r.got, r.sum == sum);
    sync_point();
}

/* An echo of 64-byte messages in blocking calls, as sockperf's ping-pong: each side reads
 * the other's message with a blocking read. Under the preload the SDP run's statistics show
 * how many of them needed a bell (the test reads them at the sync point). */
#define PINGS 2000
static void *echo_fn(void *p) {
    int fd = *(int *)p;
    char m[64];
    for (int i = 0; i < PINGS; i++) {
        size_t got = 0;
        while (got < sizeof m) {
            ssize_t n = read(fd, m + got, sizeof m - got);
            CHECK(n > 0);
            got += n;
        }
        CHECK(write(fd, m, sizeof m) == (ssize_t)sizeof m);
    }
    return NULL;
}

static void c_pingpong(void) {
    /* A busy-poll budget far longer than a round trip, even on a loaded machine where the
     * peer thread waits for a CPU for milliseconds: the spins the test counts on must not end
     * for want of time (the library reads it at its first spin, after this). */
    setenv("LIBSDP_SPIN_US", "200000", 1);
    fresh_pair(&C, &S);
    pthread_t t = spawn(echo_fn, &S);
    char m[64], back[64];
    int same = 1;
    for (int i = 0; i < PINGS; i++) {
        memset(m, 'a' + i % 26, sizeof m);
        CHECK(write(C, m, sizeof m) == (ssize_t)sizeof m);
        size_t got = 0;
        while (got < sizeof back) {
            ssize_t n = read(C, back + got, sizeof back - got);
            CHECK(n > 0);
            got += n;
        }
        same &= memcmp(m, back, sizeof m) == 0;
    }
    pthread_join(t, NULL);
    printf("pingpong: %d round trips, answers right=%d\n", PINGS, same);
    sync_point();
}

/* ---- Readiness from the rings in epoll_wait (ops::offload::quiet) ---- */

/* The same echo with both ends waiting in level-triggered epoll (redis and its benchmark),
 * then what a message reported by epoll_wait but left unread looks like to poll and to an
 * epoll set nested in another. */
static void *epoll_echo_fn(void *p) {
    int fd = *(int *)p;
    int ep = epoll_create1(0);
    CHECK(ep >= 0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 7};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0);
    char m[64];
    for (int i = 0; i < PINGS; i++) {
        size_t got = 0;
        while (got < sizeof m) {
            struct epoll_event out;
            CHECK(epoll_wait(ep, &out, 1, -1) == 1 && out.data.u64 == 7);
            ssize_t n = read(fd, m + got, sizeof m - got);
            CHECK(n > 0);
            got += n;
        }
        CHECK(write(fd, m, sizeof m) == (ssize_t)sizeof m);
    }
    /* Once the other side waits again: the message comes while it polls the rings. */
    sleep_ms(50);
    CHECK(write(fd, "late", 4) == 4);
    close(ep);
    return NULL;
}

static void epoll_pingpong(int reregister) {
    setenv("LIBSDP_SPIN_US", "200000", 1); /* as in c_pingpong */
    fresh_pair(&C, &S);
    int ep = epoll_create1(0);
    CHECK(ep >= 0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 42};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, C, &ev) == 0);
    pthread_t t = spawn(epoll_echo_fn, &S);
    char m[64], back[64];
    int same = 1;
    for (int i = 0; i < PINGS; i++) {
        memset(m, 'a' + i % 26, sizeof m);
        if (reregister) {
            /* hiredis and redis-benchmark's ae around every request: the connection is
             * registered for writing, written, then registered for reading again. */
            struct epoll_event wr = {.events = EPOLLOUT, .data.u64 = 42};
            CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, C, NULL) == 0);
            CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, C, &wr) == 0);
            struct epoll_event out;
            CHECK(epoll_wait(ep, &out, 1, -1) == 1 && (out.events & EPOLLOUT));
        }
        CHECK(write(C, m, sizeof m) == (ssize_t)sizeof m);
        if (reregister) {
            CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, C, NULL) == 0);
            CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, C, &ev) == 0);
        }
        size_t got = 0;
        while (got < sizeof back) {
            struct epoll_event out;
            CHECK(epoll_wait(ep, &out, 1, -1) == 1 && out.data.u64 == 42);
            ssize_t n = read(C, back + got, sizeof back - got);
            CHECK(n > 0);
            got += n;
        }
        same &= memcmp(m, back, sizeof m) == 0;
    }
    printf("epoll pingpong: %d round trips, answers right=%d\n", PINGS, same);
    struct epoll_event out = {0};
    int n = epoll_wait(ep, &out, 1, 2000);
    pthread_join(t, NULL);
    printf("late message: %d data=%llu IN=%d\n", n, (unsigned long long)out.data.u64,
           !!(out.events & EPOLLIN));
    n = epoll_wait(ep, &out, 1, 0);
    printf("again without waiting: %d\n", n);
    struct pollfd pfd = {.fd = C, .events = POLLIN};
    n = poll(&pfd, 1, 2000);
    printf("poll after epoll: %d IN=%d\n", n, !!(pfd.revents & POLLIN));
    int outer = epoll_create1(0);
    CHECK(outer >= 0);
    struct epoll_event oev = {.events = EPOLLIN, .data.u64 = 9};
    CHECK(epoll_ctl(outer, EPOLL_CTL_ADD, ep, &oev) == 0);
    n = epoll_wait(outer, &out, 1, 2000);
    printf("nested: %d data=%llu\n", n, (unsigned long long)out.data.u64);
    char late[8] = {0};
    printf("read: %s %s\n", res(read(C, late, sizeof late)), late);
    n = epoll_wait(ep, &out, 1, 0);
    printf("after the read: %d\n", n);
    close(outer);
    close(ep);
    sync_point();
}

static void c_epoll_pingpong(void) { epoll_pingpong(0); }
static void c_epoll_pingpong_reregister(void) { epoll_pingpong(1); }

/* Registers `fd` in `ep` for EPOLLIN with `data`. */
static void add_in(int ep, int fd, unsigned long long data) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = data};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0);
}

/* A new epoll set watching `fd` for EPOLLIN with `data`. */
static int set_of(int fd, unsigned long long data) {
    int ep = epoll_create1(0);
    CHECK(ep >= 0);
    add_in(ep, fd, data);
    return ep;
}

/* A thread asleep in poll, or in a blocking read, on a connection that another thread's
 * epoll_wait polls: the message that comes after that wait returned wakes the sleeper. */
struct sleeper {
    int fd;
    int use_read;
    int n;
    short revents;
    double woke;
};

static void *sleeper_fn(void *p) {
    struct sleeper *s = p;
    if (s->use_read) {
        char b[8];
        s->n = (int)read(s->fd, b, sizeof b);
    } else {
        struct pollfd pf = {.fd = s->fd, .events = POLLIN};
        s->n = poll(&pf, 1, 3000);
        s->revents = pf.revents;
    }
    s->woke = now_ms();
    return NULL;
}

static void c_epoll_other_sleepers(void) {
    int c1, s1, c2, s2;
    fresh_pair(&c1, &s1);
    fresh_pair(&c2, &s2);
    int ep = set_of(c1, 1);
    add_in(ep, c2, 2);
    struct timeval tv = {.tv_sec = 3};
    CHECK(setsockopt(c1, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0);
    for (int use_read = 0; use_read < 2; use_read++) {
        struct sleeper sl = {.fd = c1, .use_read = use_read};
        pthread_t t = spawn(sleeper_fn, &sl);
        sleep_ms(200); /* asleep in the kernel by now */
        write_all(s2, "y", 1);
        struct epoll_event out = {0};
        int n = epoll_wait(ep, &out, 1, 1000);
        char b[8];
        CHECK(read(c2, b, sizeof b) == 1);
        write_all(s1, "x", 1);
        double sent = now_ms();
        pthread_join(t, NULL);
        printf("%s: epoll %d data=%llu, sleeper %d IN=%d woke at once=%d\n",
               use_read ? "read" : "poll", n, (unsigned long long)out.data.u64,
               sl.n, use_read ? 1 : !!(sl.revents & POLLIN),
               sl.woke - sent < 1000);
        if (!use_read) CHECK(read(c1, b, sizeof b) == 1);
    }
    close(ep);
    sync_point();
}

/* A fork child asleep in poll on a connection its parent's epoll_wait keeps polling. */
static void c_epoll_fork_sleeper(void) {
    fresh_pair(&C, &S);
    int ep = set_of(C, 42);
    struct epoll_event out;
    printf("before: %d\n", epoll_wait(ep, &out, 1, 0));
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        struct pollfd pf = {.fd = C, .events = POLLIN};
        int n = poll(&pf, 1, 3000);
        _exit(n == 1 && (pf.revents & POLLIN) ? 0 : 1);
    }
    /* The parent polls the set all along, without reading or sleeping. */
    double t0 = now_ms();
    int wrote = 0, seen = 0;
    while (now_ms() - t0 < 600) {
        if (!wrote && now_ms() - t0 > 200) {
            write_all(S, "x", 1);
            wrote = 1;
        }
        seen |= epoll_wait(ep, &out, 1, 0) == 1;
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    printf("parent saw it: %d, child saw it: %d\n", seen, WIFEXITED(st) && WEXITSTATUS(st) == 0);
    char b[8];
    printf("read: %s\n", res(read(C, b, sizeof b)));
    close(ep);
    sync_point();
}

/* A closed epoll set's number, taken by a new set, reports nothing of the old one's. */
static void c_epoll_closed_set(void) {
    fresh_pair(&C, &S);
    int e1 = set_of(C, 1);
    struct epoll_event out;
    printf("first set: %d\n", epoll_wait(e1, &out, 1, 0));
    close(e1);
    int e2 = epoll_create1(0);
    printf("same number: %d\n", e2 == e1);
    write_all(S, "x", 1);
    printf("new set: %d\n", epoll_wait(e2, &out, 1, 300));
    struct pollfd pf = {.fd = C, .events = POLLIN};
    printf("poll: %d\n", poll(&pf, 1, 1000));
    char b[8];
    printf("read: %s\n", res(read(C, b, sizeof b)));
    close(e2);
    /* A registration deleted through a duplicate of the set's descriptor. */
    int e3 = set_of(C, 3);
    printf("third set: %d\n", epoll_wait(e3, &out, 1, 0));
    int d = dup(e3);
    CHECK(d >= 0 && epoll_ctl(d, EPOLL_CTL_DEL, C, NULL) == 0);
    write_all(S, "z", 1);
    printf("after a DEL through a dup: %d\n", epoll_wait(e3, &out, 1, 300));
    printf("read: %s\n", res(read(C, b, sizeof b)));
    close(d);
    close(e3);
    sync_point();
}

/* Two connections with messages, a wait for one event at a time: both are reported (the
 * kernel's events are not starved by the rings', nor the other way round). Two with the same
 * data: two events. */
static void c_epoll_small_max(void) {
    int c1, s1, c2, s2;
    fresh_pair(&c1, &s1);
    fresh_pair(&c2, &s2);
    int ep = set_of(c1, 1);
    add_in(ep, c2, 2);
    struct epoll_event out[8];
    printf("idle: %d\n", epoll_wait(ep, out, 8, 0));
    write_all(s1, "a", 1);
    write_all(s2, "b", 1);
    sleep_ms(50);
    int seen1 = 0, seen2 = 0, ones = 1;
    for (int i = 0; i < 8; i++) {
        int n = epoll_wait(ep, out, 1, 1000);
        ones &= n == 1;
        if (n == 1) {
            seen1 |= out[0].data.u64 == 1;
            seen2 |= out[0].data.u64 == 2;
        }
    }
    printf("one at a time: each 1=%d saw 1=%d saw 2=%d\n", ones, seen1, seen2);
    int n = epoll_wait(ep, out, 8, 1000);
    printf("all at once: %d\n", n);
    /* The same data for both. */
    struct epoll_event same = {.events = EPOLLIN, .data.u64 = 5};
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, c1, &same) == 0);
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, c2, &same) == 0);
    n = epoll_wait(ep, out, 8, 1000);
    printf("same data: %d first=%llu second=%llu\n", n, (unsigned long long)out[0].data.u64,
           (unsigned long long)(n > 1 ? out[1].data.u64 : 0));
    /* A buffer the kernel cannot write. */
    void *gone = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(gone != MAP_FAILED && munmap(gone, 4096) == 0);
    struct epoll_event *volatile bad = gone;
    printf("bad buffer: %s\n", res(epoll_wait(ep, bad, 8, 1000)));
    char b[8];
    CHECK(read(c1, b, sizeof b) == 1 && read(c2, b, sizeof b) == 1);
    printf("read both: %d\n", epoll_wait(ep, out, 8, 0));
    close(ep);
    sync_point();
}

static void c_timeouts(void) {
    fresh_pair(&C, &S);
    struct timeval tv = {.tv_usec = 200000};
    CHECK(setsockopt(S, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0);
    struct timeval back;
    socklen_t len = sizeof back;
    CHECK(getsockopt(S, SOL_SOCKET, SO_RCVTIMEO, &back, &len) == 0);
    printf("SO_RCVTIMEO get: %ld.%06ld\n", (long)back.tv_sec, (long)back.tv_usec);
    char b[16];
    double t0 = now_ms();
    ssize_t n = recv(S, b, sizeof b, 0);
    double el = now_ms() - t0;
    printf("recv timeout: %s waited=%d not too long=%d\n", res(n), el >= 150, el < 2000);
    t0 = now_ms();
    n = read(S, b, sizeof b);
    printf("read timeout: %s waited=%d\n", res(n), now_ms() - t0 >= 150);
    write_all(C, "data", 4);
    printf("recv with data: %s\n", res(recv(S, b, sizeof b, 0)));

    CHECK(setsockopt(C, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) == 0);
    static char chunk[1 << 16];
    size_t total = 0;
    int calls = 0;
    for (;;) {
        t0 = now_ms();
        n = send(C, chunk, sizeof chunk, 0);
        calls++;
        if (n < 0) break;
        total += (size_t)n;
        CHECK(calls < 100000);
    }
    el = now_ms() - t0;
    printf("send timeout: %s waited=%d some sent=%d\n", res(n), el >= 150, total > 0);
    sync_point();
    /* Drain so that the sender has room again. */
    size_t got = 0;
    while (got < total) {
        n = recv(S, chunk, sizeof chunk, 0);
        CHECK(n > 0);
        got += (size_t)n;
    }
    printf("drained all: %d\n", got == total);
    printf("send after drain: %s\n", res(send(C, "z", 1, 0)));
}

static volatile sig_atomic_t hits;
static void on_alarm(int sig) {
    (void)sig;
    hits++;
}

static void arm(int flags, int ms) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGALRM, &sa, NULL) == 0);
    struct itimerval it = {.it_value = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000}};
    hits = 0;
    CHECK(setitimer(ITIMER_REAL, &it, NULL) == 0);
}

static void c_eintr(void) {
    fresh_pair(&C, &S);
    char b[16];
    arm(0, 100);
    ssize_t n = recv(S, b, sizeof b, 0);
    printf("recv no SA_RESTART: %s hits=%d\n", res(n), (int)hits);
    arm(0, 100);
    n = read(S, b, sizeof b);
    printf("read no SA_RESTART: %s hits=%d\n", res(n), (int)hits);
    arm(SA_RESTART, 100);
    struct delayed_write d = {.fd = C, .ms = 300, .data = "late"};
    pthread_t t = spawn(delayed_write_fn, &d);
    n = recv(S, b, sizeof b, 0);
    printf("recv SA_RESTART: %s hits=%d\n", res(n), (int)hits);
    pthread_join(t, NULL);
    /* A signal does not disturb data already there. */
    write_all(C, "now", 3);
    arm(0, 50);
    sleep_ms(100);
    printf("recv queued after signal: %s\n", res(recv(S, b, sizeof b, 0)));
    sync_point();
}

/* A fork child that closes its copies of everything (Python's subprocess before exec) does
 * not take the parent's epoll registrations with it: the parent's set still reports the
 * peer's close on the connection it watches. */
static void c_epoll_after_fork_child_closes(void) {
    fresh_pair(&C, &S);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    CHECK(ep >= 0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = S};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, S, &ev) == 0);
    write_all(C, "x", 1);
    char b[4];
    struct epoll_event out[4];
    printf("data: events=%d\n", epoll_wait(ep, out, 4, 1000));
    printf("read: %s\n", res(read(S, b, sizeof b)));
    sync_point();
    pid_t k = fork();
    CHECK(k >= 0);
    if (k == 0) {
        close(S);
        close(C);
        close(ep);
        _exit(0);
    }
    int st;
    CHECK(waitpid(k, &st, 0) == k);
    close(C);
    int n = epoll_wait(ep, out, 4, 2000);
    printf("the peer's close after the child's: events=%d in=%d\n", n,
           n == 1 && (out[0].events & EPOLLIN) != 0);
    printf("read: %s\n", res(read(S, b, sizeof b)));
    close(ep);
}

static volatile sig_atomic_t usr1;
static void on_usr1(int sig) {
    (void)sig;
    usr1++;
}

#define BIG (16 << 20)
static volatile int send_done;

struct kick {
    int fd;
    pthread_t target;
};

/* The peer of a blocked sender reads a little, then signals the sender; it waits up to a
 * second for the send to return, then closes its end so that a send that did not return
 * does now (and the output differs). */
static void *read_then_signal(void *p) {
    struct kick *k = p;
    sleep_ms(200);
    char b[100];
    CHECK(recv(k->fd, b, sizeof b, 0) > 0);
    pthread_kill(k->target, SIGUSR1);
    for (int i = 0; i < 100 && !send_done; i++) sleep_ms(10);
    intptr_t prompt = send_done;
    if (!prompt) close(k->fd);
    return (void *)prompt;
}

/* Ten bytes, then a signal: at once (`gap_ms` 0) or `gap_ms` later (the receiver waits
 * again first); then, 300 ms on, the rest of 1000 bytes. */
struct ten {
    int fd;
    pthread_t target;
    int gap_ms;
};
static void *ten_then_signal(void *p) {
    struct ten *t = p;
    sleep_ms(100);
    write_all(t->fd, "0123456789", 10);
    if (t->gap_ms) sleep_ms(t->gap_ms);
    pthread_kill(t->target, SIGUSR1);
    sleep_ms(300);
    static char rest[990];
    write_all(t->fd, rest, sizeof rest);
    return NULL;
}

/* A send that blocks before it took anything (the connection was filled first): the peer
 * signals the sender, waits, then drains everything, the send's 100 bytes included. */
static size_t filled;
static void *signal_then_drain(void *p) {
    struct kick *k = p;
    sleep_ms(200);
    pthread_kill(k->target, SIGUSR1);
    sleep_ms(200);
    static char b[65536];
    size_t want = filled + 100, got = 0;
    while (got < want) {
        ssize_t n = recv(k->fd, b, sizeof b, 0);
        if (n <= 0) break;
        got += (size_t)n;
        /* Without SA_RESTART the send gave up: nothing more comes after the filling. */
        if (got == filled && send_done) break;
    }
    return NULL;
}

static void send_into_a_full_connection(int flags) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGUSR1, &sa, NULL) == 0);
    int c, s;
    fresh_pair(&c, &s);
    static char chunk[4096];
    filled = fill_until_eagain(c, chunk, sizeof chunk);
    struct kick k = {.fd = s, .target = pthread_self()};
    usr1 = 0;
    send_done = 0;
    pthread_t t = spawn(signal_then_drain, &k);
    ssize_t n = send(c, chunk, 100, 0);
    send_done = 1;
    pthread_join(t, NULL);
    printf("send into a full connection, a signal %s SA_RESTART: %s hits=%d\n",
           flags & SA_RESTART ? "with" : "without", res(n), (int)usr1);
    close(c);
    close(s);
}

/* A signal (no SA_RESTART) that reaches a thread blocked in a data call ends the call as TCP
 * ends it: a blocked send returns what it took, at once; a MSG_WAITALL receive returns the
 * bytes it has; bytes that arrive with the signal are the receive's result, not EINTR. */
static void c_signals_in_waits(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGUSR1, &sa, NULL) == 0);
    int c, s;
    fresh_pair(&c, &s);
    char *buf = calloc(1, BIG);
    CHECK(buf != NULL);
    struct kick k = {.fd = s, .target = pthread_self()};
    usr1 = 0;
    send_done = 0;
    pthread_t t = spawn(read_then_signal, &k);
    ssize_t n = send(c, buf, BIG, 0);
    send_done = 1;
    void *prompt;
    pthread_join(t, &prompt);
    printf("blocked send, then a signal: partial=%d prompt=%d hits=%d\n", n > 0 && n < BIG,
           (int)(intptr_t)prompt, (int)usr1);
    free(buf);
    close(c);
    if (prompt) close(s);

    fresh_pair(&C, &S);
    char b[1000];
    struct ten w = {.fd = C, .target = pthread_self(), .gap_ms = 50};
    usr1 = 0;
    t = spawn(ten_then_signal, &w);
    n = recv(S, b, sizeof b, MSG_WAITALL);
    printf("MSG_WAITALL, 10 bytes, then a signal: %s hits=%d\n", res(n), (int)usr1);
    pthread_join(t, NULL);
    printf("the rest: %s\n", res(recv(S, b, 990, MSG_WAITALL)));

    struct ten now = {.fd = C, .target = pthread_self(), .gap_ms = 0};
    usr1 = 0;
    t = spawn(ten_then_signal, &now);
    n = recv(S, b, sizeof b, 0);
    /* The signal may come just after the receive returned: count it once it has been sent. */
    pthread_join(t, NULL);
    printf("10 bytes and a signal at once: %s hits=%d\n", res(n), (int)usr1);
    printf("the rest: %s\n", res(recv(S, b, 990, MSG_WAITALL)));

    send_into_a_full_connection(SA_RESTART);
    send_into_a_full_connection(0);
    sync_point();
}

int main(int argc, char **argv) {
    static const struct sem_case cases[] = {
        {"select", c_select},
        {"pselect", c_pselect},
        {"poll", c_poll},
        {"ppoll", c_ppoll},
        {"epoll_lt", c_epoll_lt},
        {"epoll_et", c_epoll_et},
        {"epoll_oneshot", c_epoll_oneshot},
        {"epoll_exclusive", c_epoll_exclusive},
        {"epoll_nested", c_epoll_nested},
        {"epoll_reregister", c_epoll_reregister},
        {"blocking", c_blocking},
        {"pingpong", c_pingpong},
        {"epoll_pingpong", c_epoll_pingpong},
        {"epoll_pingpong_reregister", c_epoll_pingpong_reregister},
        {"epoll_other_sleepers", c_epoll_other_sleepers},
        {"epoll_fork_sleeper", c_epoll_fork_sleeper},
        {"epoll_closed_set", c_epoll_closed_set},
        {"epoll_small_max", c_epoll_small_max},
        {"timeouts", c_timeouts},
        {"eintr", c_eintr},
        {"signals_in_waits", c_signals_in_waits},
        {"epoll_after_fork_child_closes", c_epoll_after_fork_child_closes},
        {NULL, NULL},
    };
    return run_case(cases, argc, argv);
}
