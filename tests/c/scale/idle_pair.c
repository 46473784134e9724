/* Many idle TCP connections between two processes, driven step by step from stdin, for
 * tests/scale.rs.
 *
 *   idle_pair server PORT N [DELAY_MS]
 *                             listens on 127.0.0.1:PORT and serves every connection from one
 *                             epoll loop: echoes what it reads, closes on end of stream.
 *                             Prints "accepted N" once N connections are accepted and
 *                             "drained N" once N connections were closed by the client.
 *                             With DELAY_MS, prints "listening" and accepts nothing for that
 *                             long (a server slower than its clients).
 *   idle_pair client PORT N   waits for commands on stdin, one per line:
 *                               connect -> opens N connections (blocking connect),
 *                                          prints "connected N"; never more than AHEAD
 *                                          of them wait in the server's accept queue
 *                               ping    -> writes one byte on every connection, then reads
 *                                          the echo of each, prints "pinged N"
 *                               close   -> closes every connection, prints "closed N"
 *                               exit    -> exits 0
 *
 * Both raise RLIMIT_NOFILE toward what N connections need (see need_fds()). Any failure prints
 * "error: ..." with errno and exits 1, so the test fails with the reason. */
#include <arpa/inet.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what, long i) {
    printf("error: %s (%ld): %s\n", what, i, strerror(errno));
    fflush(stdout);
    exit(1);
}

/* Descriptors N connections may take: the test checks the real figure; this only has to be
 * generous (an offloaded connection holds the app end, the shadow TCP socket, both bell ends,
 * the memfd, a pidfd, a timerfd on demand), plus the process's own. */
static rlim_t need_fds(long n) { return (rlim_t)n * 10 + 1024; }

/* Soft limit up to what N connections need: raised past the hard limit if we may
 * (CAP_SYS_RESOURCE), else up to the hard limit, which the test sized N for. */
static void raise_nofile(long n) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl)) die("getrlimit", 0);
    rlim_t want = need_fds(n);
    if (rl.rlim_cur >= want) return;
    struct rlimit up = { .rlim_cur = want, .rlim_max = rl.rlim_max > want ? rl.rlim_max : want };
    if (setrlimit(RLIMIT_NOFILE, &up) == 0) return;
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl)) die("setrlimit RLIMIT_NOFILE", (long)rl.rlim_max);
}

static struct sockaddr_in addr_of(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static void say(const char *what, long n) {
    printf("%s %ld\n", what, n);
    fflush(stdout);
}

static _Noreturn void server(int port, long n, long delay_ms) {
    int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (l < 0) die("socket", 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = addr_of(port);
    if (bind(l, (struct sockaddr *)&a, sizeof a)) die("bind", port);
    if (listen(l, 4096)) die("listen", port);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1", 0);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = l };
    if (epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev)) die("epoll_ctl listener", l);
    if (delay_ms > 0) {
        say("listening", port);
        usleep((useconds_t)delay_ms * 1000);
    }
    long accepted = 0, drained = 0;
    struct epoll_event evs[256];
    for (;;) {
        int k = epoll_wait(ep, evs, 256, -1);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait", 0);
        }
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            if (fd == l) {
                for (;;) {
                    int c = accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0) {
                        if (errno == EAGAIN || errno == EINTR) break;
                        die("accept4", accepted);
                    }
                    struct epoll_event cev = { .events = EPOLLIN | EPOLLRDHUP, .data.fd = c };
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev)) die("epoll_ctl", c);
                    if (++accepted == n) say("accepted", accepted);
                }
                continue;
            }
            char buf[256];
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) {
                if (write(fd, buf, (size_t)r) != r) die("echo write", fd);
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
                if (++drained == n) say("drained", drained);
            }
        }
    }
}

/* Connections the client may have waiting in the server's accept queue. libsdp waits for
 * a connection's SDP setup a bounded time (PENDING_TIMEOUT after the server's accept, and
 * until then PENDING_ACCEPT_LIMIT in the accept queue; before that limit existed, 2 s from
 * the connect) and leaves it on TCP past it, so a client that outruns its server by
 * thousands of connections measures how fast the server accepts, not whether 10,000
 * connections work. */
#define AHEAD 32

/* Length of the accept queue of the listener on port `port`, asked of the kernel by
 * sock_diag (listeners only, so the answer stays small however many connections exist);
 * -1 if none is found. */
static long accept_queue(int port) {
    int nl = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (nl < 0) die("socket(NETLINK_SOCK_DIAG)", 0);
    struct {
        struct nlmsghdr nlh;
        struct inet_diag_req_v2 r;
    } req;
    memset(&req, 0, sizeof req);
    req.nlh.nlmsg_len = sizeof req;
    req.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    req.nlh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.r.sdiag_family = AF_INET;
    req.r.sdiag_protocol = IPPROTO_TCP;
    req.r.idiag_states = 1 << 10; /* TCP_LISTEN */
    if (send(nl, &req, sizeof req, 0) != (ssize_t)sizeof req) die("sock_diag request", 0);
    long q = -1;
    char buf[16384];
    for (int done = 0; !done;) {
        ssize_t len = recv(nl, buf, sizeof buf, 0);
        if (len <= 0) die("sock_diag answer", 0);
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)len);
             h = NLMSG_NEXT(h, len)) {
            if (h->nlmsg_type == NLMSG_DONE || h->nlmsg_type == NLMSG_ERROR) {
                done = 1;
                break;
            }
            struct inet_diag_msg *m = NLMSG_DATA(h);
            if (ntohs(m->id.idiag_sport) == port) q = (long)m->idiag_rqueue;
        }
    }
    close(nl);
    return q;
}

static void pace(int port) {
    for (int tries = 0; accept_queue(port) > AHEAD / 2; tries++) {
        if (tries > 60000) { /* a minute */
            errno = ETIMEDOUT;
            die("the server stopped accepting", port);
        }
        usleep(1000);
    }
}

static int client(int port, long n) {
    int *fds = calloc((size_t)n, sizeof *fds);
    if (!fds) die("calloc", n);
    struct sockaddr_in a = addr_of(port);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strcmp(line, "connect\n")) {
            for (long i = 0; i < n; i++) {
                fds[i] = socket(AF_INET, SOCK_STREAM, 0);
                if (fds[i] < 0) die("socket", i);
                if (connect(fds[i], (struct sockaddr *)&a, sizeof a)) die("connect", i);
                if (i % AHEAD == AHEAD - 1) pace(port);
            }
            say("connected", n);
        } else if (!strcmp(line, "ping\n")) {
            /* All writes first, then all reads: every connection carries a byte each way at
             * once, as an idle server's clients wake up together. */
            for (long i = 0; i < n; i++) {
                char b = (char)('a' + i % 26);
                if (write(fds[i], &b, 1) != 1) die("write", i);
            }
            for (long i = 0; i < n; i++) {
                char b = 0;
                ssize_t r = read(fds[i], &b, 1);
                if (r != 1) die(r == 0 ? "read: end of stream" : "read", i);
                if (b != (char)('a' + i % 26)) {
                    errno = EBADMSG;
                    die("echo differs", i);
                }
            }
            say("pinged", n);
        } else if (!strcmp(line, "close\n")) {
            for (long i = 0; i < n; i++)
                if (close(fds[i])) die("close", i);
            say("closed", n);
        } else if (!strcmp(line, "exit\n")) {
            return 0;
        } else {
            errno = EINVAL;
            die("unknown command", 0);
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4 && !(argc == 5 && !strcmp(argv[1], "server"))) {
        fprintf(stderr, "usage: %s server PORT N [DELAY_MS] | client PORT N\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[2]);
    long n = atol(argv[3]);
    if (port <= 0 || port > 65535 || n <= 0) {
        fprintf(stderr, "bad PORT or N\n");
        return 2;
    }
    raise_nofile(n);
    /* A write to a connection the peer dropped reports EPIPE here instead of killing. */
    signal(SIGPIPE, SIG_IGN);
    if (!strcmp(argv[1], "server")) server(port, n, argc == 5 ? atol(argv[4]) : 0);
    if (!strcmp(argv[1], "client")) return client(port, n);
    fprintf(stderr, "server or client, not %s\n", argv[1]);
    return 2;
}
