/* Data calls: the read/write family, MSG_* flags, OOB with SIOCATMARK, sendfile and splice,
 * shutdown in each direction, SIGPIPE and MSG_NOSIGNAL. */
#include "sem.h"
#include <sys/sendfile.h>
#include <sys/uio.h>
#include <sys/syscall.h>

static int C, S;

static void show(const char *what, ssize_t n, const char *buf) {
    if (n > 0)
        printf("%s: %zd \"%.*s\"\n", what, n, (int)n, buf);
    else
        printf("%s: %s\n", what, res(n));
}

static void c_calls(void) {
    fresh_pair(&C, &S);
    char b[64];
    ssize_t n;
    write_all(C, "write", 5);
    show("read", n = read(S, b, sizeof b), b);

    struct iovec wv[3] = {{"wr", 2}, {"it", 2}, {"ev", 2}};
    printf("writev: %s\n", res(writev(C, wv, 3)));
    char r1[2], r2[10];
    struct iovec rv[2] = {{r1, 2}, {r2, 10}};
    n = readv(S, rv, 2);
    printf("readv: %zd \"%.2s\" \"%.*s\"\n", n, r1, (int)(n > 2 ? n - 2 : 0), r2);

    printf("send: %s\n", res(send(S, "send", 4, 0)));
    show("recv", recv(C, b, sizeof b, 0), b);

    printf("sendto NULL: %s\n", res(sendto(C, "sendto", 6, 0, NULL, 0)));
    struct sockaddr_in from;
    memset(&from, 0xff, sizeof from);
    socklen_t flen = sizeof from;
    n = recvfrom(S, b, sizeof b, 0, (struct sockaddr *)&from, &flen);
    show("recvfrom", n, b);
    printf("recvfrom addrlen: %u\n", (unsigned)flen);
    /* A destination on a connected stream socket is ignored. */
    printf("sendto peer addr: %s\n",
           res(sendto(C, "addr", 4, 0, (struct sockaddr *)&listen_addr, sizeof listen_addr)));
    show("recvfrom NULL", recvfrom(S, b, sizeof b, 0, NULL, NULL), b);

    struct iovec mv[2] = {{"send", 4}, {"msg", 3}};
    struct msghdr m = {.msg_iov = mv, .msg_iovlen = 2};
    printf("sendmsg: %s\n", res(sendmsg(S, &m, 0)));
    char a1[3], a2[20];
    struct iovec iv[2] = {{a1, 3}, {a2, 20}};
    struct sockaddr_in name;
    char ctl[64];
    struct msghdr rm = {.msg_name = &name, .msg_namelen = sizeof name, .msg_iov = iv, .msg_iovlen = 2,
                        .msg_control = ctl, .msg_controllen = sizeof ctl};
    n = recvmsg(C, &rm, 0);
    printf("recvmsg: %zd \"%.3s\" \"%.*s\" namelen=%u controllen=%zu flags=%d\n", n, a1,
           (int)(n > 3 ? n - 3 : 0), a2, (unsigned)rm.msg_namelen, (size_t)rm.msg_controllen,
           rm.msg_flags);
    /* A short buffer: the rest stays for the next read, no MSG_TRUNC on a stream. */
    write_all(C, "0123456789", 10);
    sleep_ms(50);
    struct iovec one = {b, 4};
    struct msghdr sm = {.msg_iov = &one, .msg_iovlen = 1};
    n = recvmsg(S, &sm, 0);
    printf("recvmsg short: %zd \"%.4s\" flags=%d\n", n, b, sm.msg_flags);
    sync_point();
    show("rest", recv(S, b, sizeof b, 0), b);
    printf("zero-length send: %s\n", res(send(C, b, 0, 0)));
    printf("zero-length recv (nothing queued): %s\n", res(recv(S, b, 0, MSG_DONTWAIT)));
}

static void c_peek(void) {
    fresh_pair(&C, &S);
    char b[16];
    write_all(C, "peekaboo", 8);
    sleep_ms(50);
    show("peek 4", recv(S, b, 4, MSG_PEEK), b);
    show("peek all", recv(S, b, sizeof b, MSG_PEEK), b);
    show("read 2", recv(S, b, 2, 0), b);
    show("peek after read", recv(S, b, sizeof b, MSG_PEEK), b);
    sync_point();
    show("read rest", recv(S, b, sizeof b, 0), b);
    printf("peek empty dontwait: %s\n", res(recv(S, b, sizeof b, MSG_PEEK | MSG_DONTWAIT)));
    struct delayed_write d = {.fd = C, .ms = 100, .data = "late"};
    pthread_t t = spawn(delayed_write_fn, &d);
    show("blocking peek", recv(S, b, sizeof b, MSG_PEEK), b);
    pthread_join(t, NULL);
    show("read", recv(S, b, sizeof b, 0), b);
}

struct pieces {
    int fd;
};

static void *pieces_fn(void *p) {
    struct pieces *x = p;
    for (int i = 0; i < 3; i++) {
        sleep_ms(60);
        write_all(x->fd, "0123456789", 10);
    }
    return NULL;
}

static void c_waitall(void) {
    fresh_pair(&C, &S);
    char b[64];
    struct pieces p = {.fd = C};
    pthread_t t = spawn(pieces_fn, &p);
    show("recv WAITALL 30", recv(S, b, 30, MSG_WAITALL), b);
    pthread_join(t, NULL);
    write_all(C, "abc", 3);
    sync_point();
    shutdown(C, SHUT_WR);
    /* End of stream ends a WAITALL receive short. */
    show("recv WAITALL at eof", recv(S, b, 30, MSG_WAITALL), b);
    show("then", recv(S, b, 30, MSG_WAITALL), b);
}

static void c_dontwait(void) {
    fresh_pair(&C, &S);
    char b[16];
    printf("recv DONTWAIT empty: %s\n", res(recv(S, b, sizeof b, MSG_DONTWAIT)));
    int fl = fcntl(S, F_GETFL);
    printf("still blocking: %d\n", !(fl & O_NONBLOCK));
    /* The error queue never waits (a blocking socket, nothing queued there). */
    printf("recv ERRQUEUE empty: %s\n", res(recv(S, b, sizeof b, MSG_ERRQUEUE)));
    write_all(C, "x", 1);
    sleep_ms(50);
    printf("recv ERRQUEUE with data queued: %s\n", res(recv(S, b, sizeof b, MSG_ERRQUEUE)));
    show("recv DONTWAIT data", recv(S, b, sizeof b, MSG_DONTWAIT), b);
    /* Fill the send side without blocking. */
    static char chunk[1 << 16];
    size_t total = 0;
    ssize_t n;
    while ((n = send(C, chunk, sizeof chunk, MSG_DONTWAIT)) > 0) total += (size_t)n;
    printf("send DONTWAIT full: %s some=%d\n", res(n), total > 0);
    sync_point();
    size_t got = 0;
    while (got < total) {
        n = recv(S, chunk, sizeof chunk, 0);
        CHECK(n > 0);
        got += (size_t)n;
    }
    printf("all delivered: %d\n", got == total);
}

static void c_oob(void) {
    fresh_pair(&C, &S);
    char b[16];
    int mark = -1;
    CHECK(ioctl(S, SIOCATMARK, &mark) == 0);
    printf("SIOCATMARK idle: %d\n", mark);
    write_all(C, "abc", 3);
    printf("send OOB: %s\n", res(send(C, "!", 1, MSG_OOB)));
    int r = poll1(S, POLLIN | POLLPRI, 1000);
    printf("poll: %s\n", pollstr(r));
    CHECK(ioctl(S, SIOCATMARK, &mark) == 0);
    printf("SIOCATMARK before reading: %d\n", mark);
    show("recv", recv(S, b, sizeof b, 0), b);
    CHECK(ioctl(S, SIOCATMARK, &mark) == 0);
    printf("SIOCATMARK at mark: %d\n", mark);
    show("recv OOB", recv(S, b, 1, MSG_OOB), b);
    printf("recv OOB again: %s\n", res(recv(S, b, 1, MSG_OOB | MSG_DONTWAIT)));
    sync_point();
    write_all(C, "def", 3);
    show("recv after", recv(S, b, sizeof b, 0), b);
    printf("recv OOB none: %s\n", res(recv(S, b, 1, MSG_OOB | MSG_DONTWAIT)));
}

/* SO_OOBINLINE on the receiver: the urgent byte stays in the stream (ftplib's ABOR, sent
 * with MSG_OOB to a server that set it: the line's '\n' is the urgent byte). Set on the
 * accepted socket, and inherited by an accepted socket from its listener. */
static void c_oobinline(void) {
    fresh_pair(&C, &S);
    int one = 1;
    CHECK(setsockopt(S, SOL_SOCKET, SO_OOBINLINE, &one, sizeof one) == 0);
    int v = 0;
    socklen_t vl = sizeof v;
    CHECK(getsockopt(S, SOL_SOCKET, SO_OOBINLINE, &v, &vl) == 0);
    printf("SO_OOBINLINE: %d\n", v);
    char b[16];
    printf("send ABOR with MSG_OOB: %s\n", res(send(C, "ABOR\r\n", 6, MSG_OOB)));
    int r = poll1(S, POLLIN | POLLPRI, 1000);
    printf("poll: %s\n", pollstr(r));
    size_t got = 0;
    while (got < 6) {
        ssize_t n = recv(S, b + got, 6 - got, 0);
        CHECK(n > 0);
        got += (size_t)n;
    }
    printf("inline: %d \"%.4s\" ends with CRLF=%d\n", (int)got, b, b[4] == '\r' && b[5] == '\n');
    printf("recv OOB: %s\n", res(recv(S, b, 1, MSG_OOB | MSG_DONTWAIT)));
    write_all(C, "next", 4);
    read_all(S, b, 4);
    printf("after: \"%.4s\"\n", b);
    /* Inherited from the listener. */
    int l = listener();
    CHECK(setsockopt(l, SOL_SOCKET, SO_OOBINLINE, &one, sizeof one) == 0);
    int c2, s2;
    pair_on(l, &c2, &s2);
    vl = sizeof v;
    CHECK(getsockopt(s2, SOL_SOCKET, SO_OOBINLINE, &v, &vl) == 0);
    printf("accepted inherits SO_OOBINLINE: %d\n", v);
    printf("send with MSG_OOB: %s\n", res(send(c2, "xy!", 3, MSG_OOB)));
    read_all(s2, b, 3);
    printf("inline from the listener's: \"%.3s\"\n", b);
    sync_point();
}

/* SO_RCVBUF set on the listener (inherited by the accepted socket) and SO_SNDBUF set after
 * connect bound the bytes in flight: a non-blocking writer fills them, and a receiver that
 * reads a little and closes makes the writer's next writes fail (asyncio's sendfile relies on
 * it to see a peer that closed mid-transfer). */
static void c_small_buffers(void) {
    int l = listener();
    int four_k = 4096;
    CHECK(setsockopt(l, SOL_SOCKET, SO_RCVBUF, &four_k, sizeof four_k) == 0);
    int c, s;
    pair_on(l, &c, &s);
    CHECK(setsockopt(c, SOL_SOCKET, SO_SNDBUF, &four_k, sizeof four_k) == 0);
    exchange(c, s);
    sync_point();
    CHECK(fcntl(c, F_SETFL, O_NONBLOCK) == 0);
    static char chunk[16384];
    memset(chunk, 'x', sizeof chunk);
    long total = 0;
    for (int i = 0; i < 1000; i++) {
        ssize_t n = send(c, chunk, sizeof chunk, MSG_NOSIGNAL);
        if (n < 0) {
            CHECK(errno == EAGAIN);
            break;
        }
        total += n;
    }
    printf("a writer fills the buffers: %d\n", total > 0);
    printf("in flight at most 256 KiB: %d\n", total <= 256 * 1024);
    char b[1024];
    read_all(s, b, sizeof b);
    close(s);
    sleep_ms(100);
    int err = 0;
    long more = 0;
    for (int i = 0; i < 2000 && !err; i++) {
        ssize_t n = send(c, chunk, sizeof chunk, MSG_NOSIGNAL);
        if (n >= 0)
            more += n;
        else if (errno == EAGAIN)
            sleep_ms(1);
        else
            err = errno;
    }
    printf("the writer sees the reset: %d (after at most 256 KiB more: %d)\n",
           err == ECONNRESET || err == EPIPE, more <= 256 * 1024);
}

static void c_more(void) {
    fresh_pair(&C, &S);
    char b[64];
    printf("send MORE: %s\n", res(send(C, "head-", 5, MSG_MORE)));
    printf("send: %s\n", res(send(C, "tail", 4, 0)));
    size_t got = 0;
    while (got < 9) {
        ssize_t n = recv(S, b + got, sizeof b - got, 0);
        CHECK(n > 0);
        got += (size_t)n;
    }
    printf("received: \"%.*s\"\n", (int)got, b);
    int one = 1;
    printf("TCP_CORK: %d\n", setsockopt(C, IPPROTO_TCP, TCP_CORK, &one, sizeof one));
    write_all(C, "cork", 4);
    one = 0;
    printf("TCP_CORK off: %d\n", setsockopt(C, IPPROTO_TCP, TCP_CORK, &one, sizeof one));
    read_all(S, b, 4);
    printf("corked: \"%.4s\"\n", b);
    sync_point();
}

static int tmpfile_of(size_t len, unsigned long *sum) {
    char path[] = "/tmp/sem-XXXXXX";
    int f = mkstemp(path);
    CHECK(f >= 0);
    unlink(path);
    char *buf = malloc(len);
    CHECK(buf);
    *sum = 0;
    for (size_t i = 0; i < len; i++) *sum += (unsigned char)(buf[i] = (char)(i * 13 + 1));
    write_all(f, buf, len);
    free(buf);
    return f;
}

struct sink {
    int fd;
    size_t want, got;
    unsigned long sum;
};

static void *sink_fn(void *p) {
    struct sink *k = p;
    static char buf[65536];
    while (k->got < k->want) {
        ssize_t n = read(k->fd, buf, sizeof buf);
        CHECK(n > 0);
        for (ssize_t i = 0; i < n; i++) k->sum += (unsigned char)buf[i];
        k->got += (size_t)n;
    }
    return NULL;
}

static void c_sendfile(void) {
    fresh_pair(&C, &S);
    size_t len = 3 << 20;
    unsigned long sum;
    int f = tmpfile_of(len, &sum);
    struct sink k = {.fd = S, .want = len};
    pthread_t t = spawn(sink_fn, &k);
    off_t off = 0;
    size_t sent = 0;
    while (sent < len) {
        ssize_t n = sendfile(C, f, &off, len - sent);
        CHECK(n > 0);
        sent += (size_t)n;
    }
    pthread_join(t, NULL);
    printf("sendfile: %zu offset=%ld received=%zu sum ok=%d\n", sent, (long)off, k.got, k.sum == sum);
    /* Without an offset: the file position moves. */
    CHECK(lseek(f, len - 100, SEEK_SET) >= 0);
    ssize_t n = sendfile(C, f, NULL, 1000);
    char b[200];
    read_all(S, b, 100);
    printf("sendfile at position: %s pos=%ld\n", res(n), (long)lseek(f, 0, SEEK_CUR));
    sync_point();
}

static void c_splice(void) {
    fresh_pair(&C, &S);
    size_t len = 1 << 20;
    unsigned long sum;
    int f = tmpfile_of(len, &sum);
    int p[2];
    CHECK(pipe(p) == 0);
    struct sink k = {.fd = S, .want = len};
    pthread_t t = spawn(sink_fn, &k);
    loff_t off = 0;
    size_t moved = 0;
    while (moved < len) {
        ssize_t n = splice(f, &off, p[1], NULL, len - moved, 0);
        CHECK(n > 0);
        ssize_t m = 0;
        while (m < n) {
            ssize_t x = splice(p[0], NULL, C, NULL, (size_t)(n - m), 0);
            CHECK(x > 0);
            m += x;
        }
        moved += (size_t)n;
    }
    pthread_join(t, NULL);
    printf("file->pipe->socket: %zu received=%zu sum ok=%d\n", moved, k.got, k.sum == sum);
    /* socket -> pipe */
    write_all(C, "spliced", 7);
    ssize_t n = splice(S, NULL, p[1], NULL, 64, 0);
    char b[16];
    ssize_t r = read(p[0], b, sizeof b);
    printf("socket->pipe: %s then pipe read: %zd \"%.*s\"\n", res(n), r, (int)(r > 0 ? r : 0), b);
    sync_point();
    shutdown(C, SHUT_WR);
    printf("socket->pipe at eof: %s\n", res(splice(S, NULL, p[1], NULL, 64, 0)));
}

/* Non-blocking sendfile without an offset, and splice into a non-blocking pipe: a call moves
 * what the other end takes, and leaves the rest where it was (the file position after the
 * last byte sent; the bytes the pipe had no room for in the socket). Until 2026-11-27 the
 * library read more than it could send and lost the difference. */
static char big[1 << 20];

static void *write_big(void *p) {
    write_all(C, big, *(size_t *)p);
    return NULL;
}

static int big_pipe = -1;

static void *write_big_to_pipe(void *p) {
    write_all(big_pipe, big, *(size_t *)p);
    return NULL;
}

static void c_nonblocking_copies(void) {
    fresh_pair(&C, &S);
    size_t len = 4 << 20;
    unsigned long sum;
    int f = tmpfile_of(len, &sum);
    CHECK(lseek(f, 0, SEEK_SET) == 0);
    CHECK(fcntl(C, F_SETFL, fcntl(C, F_GETFL) | O_NONBLOCK) == 0);
    struct sink k = {.fd = S, .want = len};
    /* The reader starts at the first EAGAIN, so that both stacks are made to wait however
     * fast the reader would have been (a reader started first made TCP's wait depend on the
     * machine's load). */
    pthread_t t = 0;
    size_t sent = 0;
    int short_calls = 0;
    while (sent < len) {
        ssize_t n = sendfile(C, f, NULL, len - sent);
        if (n < 0 && errno == EAGAIN) {
            if (short_calls++ == 0) t = spawn(sink_fn, &k);
            CHECK(poll1(C, POLLOUT, 10000) > 0);
            continue;
        }
        CHECK(n > 0);
        sent += (size_t)n;
    }
    if (short_calls == 0) t = spawn(sink_fn, &k);
    pthread_join(t, NULL);
    printf("non-blocking sendfile: %zu received=%zu sum ok=%d pos=%ld waited=%d\n", sent, k.got,
           k.sum == sum, (long)lseek(f, 0, SEEK_CUR), short_calls > 0);
    close(f);
    CHECK(fcntl(C, F_SETFL, fcntl(C, F_GETFL) & ~O_NONBLOCK) == 0);
    /* socket -> a non-blocking pipe of 64 KiB, 1 MiB through it */
    int p[2];
    CHECK(pipe2(p, O_NONBLOCK) == 0);
    size_t plen = 1 << 20;
    unsigned long psum = 0, got_sum = 0;
    for (size_t i = 0; i < plen; i++) psum += (unsigned char)(big[i] = (char)(i * 7 + 3));
    pthread_t wt = spawn(write_big, &plen);
    size_t through = 0;
    int full = 0;
    static char out[65536];
    while (through < plen) {
        ssize_t n = splice(S, NULL, p[1], NULL, plen - through, SPLICE_F_NONBLOCK);
        if (n < 0 && errno == EAGAIN) {
            full++;
        } else {
            CHECK(n > 0);
        }
        ssize_t r;
        while ((r = read(p[0], out, sizeof out)) > 0) {
            for (ssize_t i = 0; i < r; i++) got_sum += (unsigned char)out[i];
            through += (size_t)r;
        }
        if (n < 0) CHECK(poll1(S, POLLIN, 10000) > 0);
    }
    pthread_join(wt, NULL);
    printf("socket->non-blocking pipe: %zu sum ok=%d\n", through, got_sum == psum);
    close(p[0]);
    close(p[1]);
    /* a pipe -> the non-blocking socket, 1 MiB through a slow reader */
    CHECK(pipe(p) == 0);
    big_pipe = p[1];
    pthread_t pt = spawn(write_big_to_pipe, &plen);
    CHECK(fcntl(C, F_SETFL, fcntl(C, F_GETFL) | O_NONBLOCK) == 0);
    int small = 16384; /* less than a pipe's 64 KiB: the socket takes part of what is there */
    CHECK(setsockopt(C, SOL_SOCKET, SO_SNDBUF, &small, sizeof small) == 0);
    struct sink k2 = {.fd = S, .want = plen};
    pthread_t t2 = spawn(sink_fn, &k2);
    size_t spliced = 0;
    int refused = 0;
    while (spliced < plen) {
        ssize_t n = splice(p[0], NULL, C, NULL, plen - spliced, 0);
        if (n < 0 && errno == EAGAIN) {
            refused++;
            CHECK(poll1(C, POLLOUT, 10000) > 0);
            continue;
        }
        CHECK(n > 0);
        spliced += (size_t)n;
    }
    pthread_join(pt, NULL);
    pthread_join(t2, NULL);
    printf("pipe->non-blocking socket: %zu received=%zu sum ok=%d\n", spliced, k2.got,
           k2.sum == psum);
    CHECK(fcntl(C, F_SETFL, fcntl(C, F_GETFL) & ~O_NONBLOCK) == 0);
    close(p[0]);
    close(p[1]);
    sync_point();
}

static void c_shutdown_wr(void) {
    fresh_pair(&C, &S);
    char b[16];
    write_all(C, "last", 4);
    printf("shutdown WR: %d\n", shutdown(C, SHUT_WR));
    printf("peer poll: %s\n", pollstr(poll1(S, POLLIN | POLLRDHUP, 1000)));
    show("peer reads data", read(S, b, sizeof b), b);
    printf("peer reads eof: %s\n", res(read(S, b, sizeof b)));
    printf("peer reads eof again: %s\n", res(read(S, b, sizeof b)));
    printf("own poll: %s\n", pollstr(poll1(C, POLLIN | POLLOUT | POLLRDHUP, 0)));
    printf("write after SHUT_WR: %s\n", res(send(C, "x", 1, MSG_NOSIGNAL)));
    /* The other direction still works. */
    write_all(S, "reply", 5);
    show("reply after half-close", read(C, b, sizeof b), b);
    sync_point();
    printf("peer shutdown WR: %d\n", shutdown(S, SHUT_WR));
    printf("both closed poll: %s\n", pollstr(poll1(C, POLLIN | POLLOUT | POLLRDHUP, 1000)));
    printf("reads eof: %s\n", res(read(C, b, sizeof b)));
}

static void c_shutdown_rd(void) {
    fresh_pair(&C, &S);
    char b[16];
    printf("shutdown RD: %d\n", shutdown(S, SHUT_RD));
    printf("recv after SHUT_RD: %s\n", res(recv(S, b, sizeof b, 0)));
    printf("poll after SHUT_RD: %s\n", pollstr(poll1(S, POLLIN | POLLOUT | POLLRDHUP, 0)));
    /* Sending still works. */
    write_all(S, "still", 5);
    show("peer reads", read(C, b, sizeof b), b);
    printf("peer poll: %s\n", pollstr(poll1(C, POLLIN | POLLOUT | POLLRDHUP, 0)));
    sync_point();
}

static void c_shutdown_rdwr(void) {
    fresh_pair(&C, &S);
    char b[16];
    write_all(S, "bye", 3);
    printf("shutdown RDWR: %d\n", shutdown(S, SHUT_RDWR));
    show("peer reads data", read(C, b, sizeof b), b);
    printf("peer reads eof: %s\n", res(read(C, b, sizeof b)));
    printf("peer poll: %s\n", pollstr(poll1(C, POLLIN | POLLRDHUP, 1000)));
    printf("own recv: %s\n", res(recv(S, b, sizeof b, 0)));
    printf("own send: %s\n", res(send(S, "x", 1, MSG_NOSIGNAL)));
    printf("own poll: %s\n", pollstr(poll1(S, POLLIN | POLLOUT | POLLRDHUP, 0)));
    printf("shutdown again: %s\n", res(shutdown(S, SHUT_RDWR)));
    sync_point();
    /* ENOTCONN on a socket that never connected. */
    int u = socket(AF_INET, SOCK_STREAM, 0);
    printf("shutdown unconnected: %s\n", res(shutdown(u, SHUT_WR)));
}

static volatile sig_atomic_t pipes;
static void on_pipe(int sig) {
    (void)sig;
    pipes++;
}

/* Writes until an error: how many signals came with it. */
static void write_until_error(int fd, int flags, const char *what) {
    ssize_t n;
    int tries = 0;
    pipes = 0;
    do {
        n = send(fd, "data", 4, flags);
        if (n >= 0) sleep_ms(10);
    } while (n >= 0 && ++tries < 300);
    printf("%s: %s sigpipes=%d\n", what, res(n), (int)pipes);
}

/* SIGPIPE counted in `pipes`; (C, S) and (*c2, *s2) connected and reported at SYNC. */
static void counting_pipes_with_two_pairs(int *c2, int *s2) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_pipe;
    CHECK(sigaction(SIGPIPE, &sa, NULL) == 0);
    fresh_pair(&C, &S);
    fresh_pair(c2, s2);
    sync_point();
}

static void c_sigpipe(void) {
    int c2, s2;
    counting_pipes_with_two_pairs(&c2, &s2);
    close(S);
    write_until_error(C, 0, "write after peer close");
    close(s2);
    write_until_error(c2, MSG_NOSIGNAL, "MSG_NOSIGNAL after peer close");
    /* With the default disposition the writer dies of SIGPIPE. */
    int c3, s3;
    fresh_pair(&c3, &s3);
    /* Closed before the fork: a send reaching a still-open s3 would leave unread data there,
     * and its close would then reset (ECONNRESET, no signal) instead of EPIPE. */
    close(s3);
    pid_t k = fork();
    CHECK(k >= 0);
    if (k == 0) {
        signal(SIGPIPE, SIG_DFL);
        for (int i = 0; i < 300; i++) {
            if (send(c3, "data", 4, 0) < 0) _exit(3);
            sleep_ms(10);
        }
        _exit(4);
    }
    close(c3);
    int st;
    CHECK(waitpid(k, &st, 0) == k);
    printf("default disposition: signaled=%d sig=%d\n", WIFSIGNALED(st), WIFSIGNALED(st) ? WTERMSIG(st) : 0);
}

static int so_error(int fd) {
    int e = -1;
    socklen_t l = sizeof e;
    CHECK(getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &l) == 0);
    return e;
}

/* The peer closed (a FIN, no reset): the first write still succeeds, the peer's RST then makes
 * SO_ERROR EPIPE once and the next write EPIPE with SIGPIPE; reads see end of stream. An HTTP
 * client on a keep-alive connection its server closed writes its request, reads 0 and
 * retries: with the default SIGPIPE disposition it must live through that write. */
static void c_write_after_close(void) {
    int c2, s2;
    counting_pipes_with_two_pairs(&c2, &s2);
    close(S);
    sleep_ms(100);
    char b[8];
    pipes = 0;
    printf("SO_ERROR after the peer's close: %s\n", en(so_error(C)));
    /* (One call a statement: C leaves the order of a call's arguments open.) */
    const char *w = res(send(C, "req", 3, 0));
    printf("first write: %s sigpipes=%d\n", w, (int)pipes);
    sleep_ms(100);
    int e1 = so_error(C);
    int e2 = so_error(C);
    printf("SO_ERROR after it: %s, then %s\n", en(e1), en(e2));
    w = res(send(C, "req", 3, 0));
    printf("second write: %s sigpipes=%d\n", w, (int)pipes);
    printf("read: %s\n", res(read(C, b, sizeof b)));
    /* A writer that shut its own sending side down first gets EPIPE whatever the peer did. */
    int c3, s3;
    fresh_pair(&c3, &s3);
    CHECK(shutdown(c3, SHUT_WR) == 0);
    printf("peer reads end of stream: %s\n", res(read(s3, b, sizeof b)));
    close(s3);
    sleep_ms(100);
    w = res(send(c3, "late", 4, MSG_NOSIGNAL));
    printf("write after our shutdown and the peer's close: %s\n", w);
    /* The keep-alive client, with SIGPIPE's default disposition. */
    close(s2);
    sleep_ms(100);
    pid_t k = fork();
    CHECK(k >= 0);
    if (k == 0) {
        signal(SIGPIPE, SIG_DFL);
        if (write(c2, "GET / HTTP/1.1\r\n\r\n", 18) != 18) _exit(3);
        _exit(read(c2, b, sizeof b) == 0 ? 0 : 4);
    }
    close(c2);
    int st;
    CHECK(waitpid(k, &st, 0) == k);
    printf("keep-alive client: signaled=%d exit=%d\n", WIFSIGNALED(st),
           WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}

/* The client half-closes first; the server then fills the connection while the client does
 * not read, and half-closes with its bytes still queued: the client reads every one of them
 * before end of stream. */
static void c_half_close_both_with_bytes_queued(void) {
    fresh_pair(&C, &S);
    write_all(C, "request", 7);
    CHECK(shutdown(C, SHUT_WR) == 0);
    printf("server read: %zu then end of stream\n", read_to_eof(S));
    char b[65536];
    memset(b, 'z', sizeof b);
    size_t sent = fill_until_eagain(S, b, sizeof b);
    CHECK(shutdown(S, SHUT_WR) == 0);
    sleep_ms(200);
    sync_point();
    size_t back = read_to_eof(C);
    printf("client read every byte the server sent: %d\n", back == sent && sent > 0);
}

/* A bulk stream as iperf3 sends it: 128 KiB writes, a reader that waits in select and
 * reads 128 KiB at a time; MSG_PEEK, FIONREAD and short reads in between. Every byte is
 * checked against its position. Under the preload the test reads at SYNC how many bytes went
 * by the one-copy paths (from the writer's buffer into the ring, from the ring into the
 * reader's buffer). */
#define BULK_WRITE (128 * 1024)
#define BULK_TOTAL (64L * 1024 * 1024)
static unsigned char bulk_byte(long at) { return (unsigned char)(at * 7 + at / 4093); }

static void *bulk_writer_fn(void *p) {
    int fd = *(int *)p;
    static unsigned char b[BULK_WRITE];
    for (long at = 0; at < BULK_TOTAL;) {
        for (int i = 0; i < BULK_WRITE; i++)
            b[i] = bulk_byte(at + i);
        write_all(fd, (char *)b, BULK_WRITE);
        at += BULK_WRITE;
    }
    return NULL;
}

static void c_bulk(void) {
    fresh_pair(&C, &S);
    pthread_t t = spawn(bulk_writer_fn, &C);
    static unsigned char b[BULK_WRITE];
    long at = 0, bad = 0, peeks_ok = 1, reads = 0;
    while (at < BULK_TOTAL) {
        fd_set r;
        FD_ZERO(&r);
        FD_SET(S, &r);
        CHECK(select(S + 1, &r, NULL, NULL, NULL) == 1);
        int queued = 0;
        CHECK(ioctl(S, FIONREAD, &queued) == 0);
        size_t want = sizeof b;
        if (++reads % 7 == 0) {
            /* A peek of what a read then takes: the same bytes. */
            unsigned char pk[100];
            ssize_t p = recv(S, pk, sizeof pk, MSG_PEEK);
            CHECK(p > 0);
            for (ssize_t i = 0; i < p; i++)
                peeks_ok &= pk[i] == bulk_byte(at + i);
            want = 1 + reads % 5000; /* short reads leave part of a message */
        }
        ssize_t n = read(S, b, want);
        CHECK(n > 0);
        peeks_ok &= queued > 0;
        for (ssize_t i = 0; i < n; i++)
            bad += b[i] != bulk_byte(at + i);
        at += n;
    }
    pthread_join(t, NULL);
    printf("bulk: %ld MiB, wrong bytes=%ld, peeks and FIONREAD right=%ld\n", at >> 20, bad,
           peeks_ok);
    sync_point();
}

/* A reader that comes late to many small messages behind a large one, while its side keeps
 * taking messages in (a poll that looks without reading, as an event loop does): the large
 * one may stay in the reader's ring until it is read, and the small ones after it need more
 * ring slots than the ring has beside it, so the library must take it out of the ring before
 * the slot is reused. Every byte is checked. */
#define LATE_SMALL 300
static char late_big[3000], late_small[LATE_SMALL][10];

static void *late_writer_fn(void *p) {
    int fd = *(int *)p;
    write_all(fd, late_big, sizeof late_big);
    for (int i = 0; i < LATE_SMALL; i++) {
        write_all(fd, late_small[i], sizeof late_small[i]);
        sleep_ms(1); /* one message each */
    }
    return NULL;
}

static void c_late_reader(void) {
    fresh_pair(&C, &S);
    for (int i = 0; i < (int)sizeof late_big; i++)
        late_big[i] = (char)(i * 13 + 1);
    for (int i = 0; i < LATE_SMALL; i++)
        snprintf(late_small[i], sizeof late_small[i], "m%08d", i);
    pthread_t t = spawn(late_writer_fn, &C);
    int queued = 0;
    while (queued < (int)(sizeof late_big + sizeof late_small)) {
        struct pollfd p = {.fd = S, .events = POLLIN};
        CHECK(poll(&p, 1, 0) >= 0);
        CHECK(ioctl(S, FIONREAD, &queued) == 0);
        sleep_ms(1);
    }
    pthread_join(t, NULL);
    static char got[sizeof late_big + sizeof late_small];
    size_t have = 0;
    while (have < sizeof got) {
        ssize_t n = read(S, got + have, sizeof got - have);
        CHECK(n > 0);
        have += n;
    }
    printf("late reader: %zu bytes, large one right=%d, small ones right=%d\n", have,
           memcmp(got, late_big, sizeof late_big) == 0,
           memcmp(got + sizeof late_big, late_small, sizeof late_small) == 0);
    sync_point();
}

/* libuv (Node.js) closes descriptors with syscall(SYS_close, fd), not close(): the peer still
 * reads end of stream, and the number, reused by the program's next socket, names that one. */
static void c_raw_syscall_close(void) {
    fresh_pair(&C, &S);
    write_all(C, "abc", 3);
    char b[8];
    printf("read: %s\n", res(read(S, b, sizeof b)));
    sync_point();
    int old = C;
    printf("syscall(SYS_close): %ld\n", syscall(SYS_close, C));
    struct pollfd p = {.fd = S, .events = POLLIN};
    printf("peer polls readable: %d\n", poll(&p, 1, 2000));
    printf("peer reads: %s\n", res(read(S, b, sizeof b)));
    close(S);
    int c2, s2;
    fresh_pair(&c2, &s2);
    printf("the next socket takes the number: %d\n", c2 == old);
    write_all(c2, "next", 4);
    printf("and carries its own bytes: %s\n", res(read(s2, b, sizeof b)));
    long r1 = syscall(SYS_close, c2);
    long r2 = syscall(SYS_close, c2);
    printf("syscall(SYS_close) twice: %ld then %ld %s\n", r1, r2, errno == EBADF ? "EBADF" : "?");
    close(s2);
}

int main(int argc, char **argv) {
    static const struct sem_case cases[] = {
        {"calls", c_calls},
        {"peek", c_peek},
        {"waitall", c_waitall},
        {"dontwait", c_dontwait},
        {"oob", c_oob},
        {"more", c_more},
        {"sendfile", c_sendfile},
        {"splice", c_splice},
        {"nonblocking_copies", c_nonblocking_copies},
        {"shutdown_wr", c_shutdown_wr},
        {"shutdown_rd", c_shutdown_rd},
        {"shutdown_rdwr", c_shutdown_rdwr},
        {"sigpipe", c_sigpipe},
        {"oobinline", c_oobinline},
        {"small_buffers", c_small_buffers},
        {"write_after_close", c_write_after_close},
        {"half_close_both_with_bytes_queued", c_half_close_both_with_bytes_queued},
        {"raw_syscall_close", c_raw_syscall_close},
        {"bulk", c_bulk},
        {"late_reader", c_late_reader},
        {NULL, NULL},
    };
    return run_case(cases, argc, argv);
}
