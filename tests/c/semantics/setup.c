/* Connection setup and socket state: names, options, ioctls, fcntl, non-blocking connect,
 * accept4 flags, connecting to one's own listener in one thread. */
#include "sem.h"
#include <linux/sockios.h>

static int C, S;

static int same_addr(const struct sockaddr_in *a, const struct sockaddr_in *b) {
    return a->sin_family == b->sin_family && a->sin_port == b->sin_port &&
           a->sin_addr.s_addr == b->sin_addr.s_addr;
}

/* The address a socket shows, as text ("127.0.0.1", "::ffff:127.0.0.1"). */
static const char *shown(int fd, int peer) {
    static char buf[4][INET6_ADDRSTRLEN];
    static int i;
    char *b = buf[i++ % 4];
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    CHECK((peer ? getpeername : getsockname)(fd, (struct sockaddr *)&ss, &len) == 0);
    if (ss.ss_family == AF_INET)
        inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, b, INET6_ADDRSTRLEN);
    else
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, b, INET6_ADDRSTRLEN);
    return b;
}

/* A listener on the wildcard address of `family` (dual stack for AF_INET6), its port in
 * network order in *port. */
static int listen_wildcard(int family, uint16_t *port) {
    int l = socket(family, SOCK_STREAM, 0);
    CHECK(l >= 0);
    int one = 1, zero = 0;
    CHECK(setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0);
    if (family == AF_INET6)
        CHECK(setsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero) == 0);
    struct sockaddr_storage ss = {.ss_family = (sa_family_t)family};
    socklen_t len = family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
    CHECK(bind(l, (struct sockaddr *)&ss, len) == 0);
    CHECK(listen(l, 16) == 0);
    CHECK(getsockname(l, (struct sockaddr *)&ss, &len) == 0);
    *port = family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                               : ((struct sockaddr_in *)&ss)->sin_port;
    return l;
}

/* A byte each way on (c, s), then the four names under `what`. */
static void exchange_and_show(int c, int s, const char *what) {
    exchange(c, s);
    printf("%s: client %s -> %s, server %s <- %s\n", what, shown(c, 0), shown(c, 1),
           shown(s, 0), shown(s, 1));
}

static void accept_and_show(int l, int c, const char *what) {
    int s = accept(l, NULL, NULL);
    CHECK(s >= 0);
    exchange_and_show(c, s, what);
}

/* Which addresses the kernel's choices give a connection the program did not bind, and which
 * descriptor numbers the program's sockets get: a client of 127.0.0.5 leaves from 127.0.0.1
 * (the loopback route's source), an AF_INET6 socket connects to an IPv4 server through a
 * v4-mapped address (as Java does for every IPv4 peer), and the library's own descriptors
 * take none of the program's numbers. */
static void c_addresses(void) {
    uint16_t port;
    int l = listen_wildcard(AF_INET, &port);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = port};
    int c1 = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(c1 >= 0);
    printf("client fd follows the listener's: %d\n", c1 == l + 1);
    struct sockaddr_in to5 = a;
    to5.sin_addr.s_addr = inet_addr("127.0.0.5");
    printf("connect to 127.0.0.5: %s\n", res(connect(c1, (struct sockaddr *)&to5, sizeof to5)));
    int s1 = accept(l, NULL, NULL);
    CHECK(s1 >= 0);
    printf("accepted fd follows the client's: %d\n", s1 == c1 + 1);
    exchange_and_show(c1, s1, "127.0.0.5");

    int c2 = socket(AF_INET6, SOCK_STREAM, 0);
    CHECK(c2 >= 0);
    struct sockaddr_in6 m = {.sin6_family = AF_INET6, .sin6_port = a.sin_port};
    CHECK(inet_pton(AF_INET6, "::ffff:127.0.0.1", &m.sin6_addr) == 1);
    printf("AF_INET6 connect to ::ffff:127.0.0.1: %s\n",
           res(connect(c2, (struct sockaddr *)&m, sizeof m)));
    accept_and_show(l, c2, "mapped");

    uint16_t port6;
    int l6 = listen_wildcard(AF_INET6, &port6);
    int c3 = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(c3 >= 0);
    struct sockaddr_in lo = {.sin_family = AF_INET, .sin_port = port6};
    lo.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    printf("AF_INET connect to a dual-stack listener: %s\n",
           res(connect(c3, (struct sockaddr *)&lo, sizeof lo)));
    accept_and_show(l6, c3, "dual stack");
    sync_point();
}

static void c_names(void) {
    int l = listener();
    pair_on(l, &C, &S);
    exchange(C, S);
    struct sockaddr_in cl, cp, sl, sp;
    socklen_t n1 = sizeof cl, n2 = sizeof cp, n3 = sizeof sl, n4 = sizeof sp;
    CHECK(getsockname(C, (struct sockaddr *)&cl, &n1) == 0);
    CHECK(getpeername(C, (struct sockaddr *)&cp, &n2) == 0);
    CHECK(getsockname(S, (struct sockaddr *)&sl, &n3) == 0);
    CHECK(getpeername(S, (struct sockaddr *)&sp, &n4) == 0);
    printf("lengths: %u %u %u %u\n", n1, n2, n3, n4);
    printf("families: %d %d %d %d\n", cl.sin_family == AF_INET, cp.sin_family == AF_INET,
           sl.sin_family == AF_INET, sp.sin_family == AF_INET);
    printf("client peer is the listener: %d\n", same_addr(&cp, &listen_addr));
    printf("server local is the listener: %d\n", same_addr(&sl, &listen_addr));
    printf("server peer is the client: %d\n", same_addr(&sp, &cl));
    printf("client address: %s ephemeral=%d\n", inet_ntoa(cl.sin_addr), ntohs(cl.sin_port) != 0);
    /* The 4-tuple is the kernel's: /proc/net/tcp has an established entry for it. */
    FILE *f = fopen("/proc/net/tcp", "r");
    CHECK(f);
    char line[512];
    int found = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned la, lp, ra, rp, st;
        if (sscanf(line, " %*d: %x:%x %x:%x %x", &la, &lp, &ra, &rp, &st) == 5 &&
            lp == ntohs(cl.sin_port) && rp == ntohs(cp.sin_port) && st == 1)
            found = 1;
    }
    fclose(f);
    printf("kernel has the 4-tuple established: %d\n", found);
    /* A short buffer is truncated, the length says the full size. */
    struct sockaddr_in small;
    socklen_t sl4 = 4;
    CHECK(getpeername(C, (struct sockaddr *)&small, &sl4) == 0);
    printf("short getpeername len: %u\n", sl4);
    sync_point();
    close(S);
    close(C);
    int u = socket(AF_INET, SOCK_STREAM, 0);
    socklen_t ul = sizeof cp;
    printf("getpeername unconnected: %s\n", res(getpeername(u, (struct sockaddr *)&cp, &ul)));
}

static void opt_int(int fd, int level, int opt, const char *name) {
    int v = -1;
    socklen_t len = sizeof v;
    int r = getsockopt(fd, level, opt, &v, &len);
    printf("%s: %s value=%d len=%u\n", name, res(r), v, len);
}

static void set_get(int fd, int level, int opt, int val, const char *name) {
    int r = setsockopt(fd, level, opt, &val, sizeof val);
    printf("set %s=%d: %s\n", name, val, res(r));
    opt_int(fd, level, opt, name);
}

static void c_sockopts(void) {
    fresh_pair(&C, &S);
    int fds[2] = {C, S};
    for (int i = 0; i < 2; i++) {
        int fd = fds[i];
        printf("-- %s\n", i ? "server" : "client");
        opt_int(fd, SOL_SOCKET, SO_ERROR, "SO_ERROR");
        opt_int(fd, SOL_SOCKET, SO_TYPE, "SO_TYPE");
        opt_int(fd, SOL_SOCKET, SO_DOMAIN, "SO_DOMAIN");
        opt_int(fd, SOL_SOCKET, SO_PROTOCOL, "SO_PROTOCOL");
        opt_int(fd, SOL_SOCKET, SO_ACCEPTCONN, "SO_ACCEPTCONN");
        int v = 262144;
        printf("set SO_RCVBUF: %d\n", setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof v));
        printf("set SO_SNDBUF: %d\n", setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v));
        socklen_t len = sizeof v;
        int r = getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, &len);
        printf("get SO_RCVBUF: %d positive=%d\n", r, v > 0);
        len = sizeof v;
        r = getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, &len);
        printf("get SO_SNDBUF: %d positive=%d\n", r, v > 0);
        opt_int(fd, SOL_SOCKET, SO_KEEPALIVE, "SO_KEEPALIVE");
        set_get(fd, SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE");
        set_get(fd, IPPROTO_TCP, TCP_KEEPIDLE, 30, "TCP_KEEPIDLE");
        set_get(fd, SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR");
        struct linger lg = {0, 0};
        len = sizeof lg;
        r = getsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, &len);
        printf("SO_LINGER default: %d onoff=%d\n", r, lg.l_onoff);
        lg.l_onoff = 1;
        lg.l_linger = 5;
        printf("set SO_LINGER: %d\n", setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg));
        memset(&lg, 0, sizeof lg);
        len = sizeof lg;
        r = getsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, &len);
        printf("get SO_LINGER: %d onoff=%d linger=%d\n", r, lg.l_onoff, lg.l_linger);
        opt_int(fd, IPPROTO_TCP, TCP_NODELAY, "TCP_NODELAY");
        set_get(fd, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY");
        struct tcp_info ti;
        memset(&ti, 0, sizeof ti);
        len = sizeof ti;
        r = getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len);
        printf("TCP_INFO: %s established=%d\n", res(r), ti.tcpi_state == 1);
        len = sizeof v;
        r = getsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &v, &len);
        printf("TCP_MAXSEG: %d positive=%d\n", r, v > 0);
        errno = 0;
        r = getsockopt(fd, SOL_SOCKET, 12345, &v, &len);
        printf("unknown option: %s\n", res(r));
    }
    exchange(C, S);
    sync_point();
}

/* Timeouts set before connect, and inherited from the listener by accept, hold on the
 * connection: a receive with nothing to read ends with EAGAIN after its timeout. */
static void c_timeouts_before_connect(void) {
    int l = listener();
    struct timeval tv = {.tv_sec = 0, .tv_usec = 300000};
    CHECK(setsockopt(l, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(c >= 0);
    CHECK(setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0);
    CHECK(setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) == 0);
    CHECK(connect(c, (struct sockaddr *)&listen_addr, sizeof listen_addr) == 0);
    int s = accept(l, NULL, NULL);
    CHECK(s >= 0);
    close(l);
    C = c;
    S = s;
    exchange(C, S);
    int fds[2] = {C, S};
    for (int i = 0; i < 2; i++) {
        struct timeval got = {0, 0};
        socklen_t len = sizeof got;
        CHECK(getsockopt(fds[i], SOL_SOCKET, SO_RCVTIMEO, &got, &len) == 0);
        char b[8];
        double t0 = now_ms();
        ssize_t n = read(fds[i], b, sizeof b);
        double took = now_ms() - t0;
        printf("%s: SO_RCVTIMEO %ld ms, read %s after the timeout=%d\n", i ? "server" : "client",
               (long)(got.tv_sec * 1000 + got.tv_usec / 1000), res(n), took >= 250 && took < 3000);
    }
    struct timeval got = {0, 0};
    socklen_t len = sizeof got;
    CHECK(getsockopt(C, SOL_SOCKET, SO_SNDTIMEO, &got, &len) == 0);
    printf("client: SO_SNDTIMEO %ld ms\n", (long)(got.tv_sec * 1000 + got.tv_usec / 1000));
    sync_point();
}

static void c_ioctls(void) {
    fresh_pair(&C, &S);
    int n = -1;
    CHECK(ioctl(S, FIONREAD, &n) == 0);
    printf("FIONREAD empty: %d\n", n);
    write_all(C, "hello", 5);
    poll1(S, POLLIN, 1000);
    sleep_ms(20);
    CHECK(ioctl(S, FIONREAD, &n) == 0);
    printf("FIONREAD after 5: %d\n", n);
    char b[8];
    read_all(S, b, 2);
    CHECK(ioctl(S, FIONREAD, &n) == 0);
    printf("FIONREAD after reading 2: %d\n", n);
    read_all(S, b, 3);
    sleep_ms(50);
    printf("SIOCOUTQ: %d ", ioctl(C, SIOCOUTQ, &n));
    printf("value=%d\n", n);
    printf("SIOCINQ: %d ", ioctl(S, SIOCINQ, &n));
    printf("value=%d\n", n);
    int on = 1;
    printf("FIONBIO on: %d\n", ioctl(S, FIONBIO, &on));
    printf("O_NONBLOCK set: %d\n", (fcntl(S, F_GETFL) & O_NONBLOCK) != 0);
    printf("recv: %s\n", res(recv(S, b, sizeof b, 0)));
    on = 0;
    printf("FIONBIO off: %d\n", ioctl(S, FIONBIO, &on));
    printf("O_NONBLOCK set: %d\n", (fcntl(S, F_GETFL) & O_NONBLOCK) != 0);
    struct delayed_write d = {.fd = C, .ms = 100, .data = "blk"};
    pthread_t t = spawn(delayed_write_fn, &d);
    printf("blocking recv again: %s\n", res(recv(S, b, sizeof b, 0)));
    pthread_join(t, NULL);
    sync_point();
}

static void c_fcntl(void) {
    fresh_pair(&C, &S);
    int fl = fcntl(S, F_GETFL);
    printf("F_GETFL: O_RDWR=%d O_NONBLOCK=%d\n", (fl & O_ACCMODE) == O_RDWR, (fl & O_NONBLOCK) != 0);
    printf("F_GETFD: %d\n", fcntl(S, F_GETFD));
    printf("F_SETFL O_NONBLOCK: %d\n", fcntl(S, F_SETFL, fl | O_NONBLOCK));
    fl = fcntl(S, F_GETFL);
    printf("F_GETFL: O_NONBLOCK=%d\n", (fl & O_NONBLOCK) != 0);
    char b[8];
    printf("read non-blocking: %s\n", res(read(S, b, sizeof b)));
    printf("write non-blocking: %s\n", res(write(S, "nb", 2)));
    read_all(C, b, 2);
    int r = fcntl(S, F_SETFD, FD_CLOEXEC);
    printf("F_SETFD FD_CLOEXEC: %d then %d\n", r, fcntl(S, F_GETFD));
    printf("F_SETFL clear: %d\n", fcntl(S, F_SETFL, fl & ~O_NONBLOCK));
    printf("F_GETFL: O_NONBLOCK=%d\n", (fcntl(S, F_GETFL) & O_NONBLOCK) != 0);
    int d = fcntl(S, F_DUPFD_CLOEXEC, 200);
    printf("F_DUPFD_CLOEXEC: at least 200=%d cloexec=%d\n", d >= 200, fcntl(d, F_GETFD));
    write_all(C, "dup", 3);
    read_all(d, b, 3);
    printf("read on the dup: %.3s\n", b);
    sync_point();
}

static void c_nb_connect(void) {
    int l = listener();
    int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    CHECK(c >= 0);
    int r = connect(c, (struct sockaddr *)&listen_addr, sizeof listen_addr);
    printf("connect: %s\n", res(r));
    int ev = poll1(c, POLLOUT, 2000);
    printf("poll: %s\n", pollstr(ev));
    int err = -1;
    socklen_t len = sizeof err;
    CHECK(getsockopt(c, SOL_SOCKET, SO_ERROR, &err, &len) == 0);
    printf("SO_ERROR: %s\n", en(err));
    printf("connect again: %s\n", res(connect(c, (struct sockaddr *)&listen_addr, sizeof listen_addr)));
    int s = accept(l, NULL, NULL);
    CHECK(s >= 0);
    printf("write: %s\n", res(write(c, "nbc", 3)));
    char b[8];
    read_all(s, b, 3);
    printf("server got: %.3s\n", b);
    write_all(s, "ack", 3);
    poll1(c, POLLIN, 2000);
    printf("client read: %s\n", res(read(c, b, sizeof b)));
    printf("client read empty: %s\n", res(read(c, b, sizeof b)));
    sync_point();
    /* Refused: nobody listens on a closed listener's port. */
    close(l);
    int c2 = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    r = connect(c2, (struct sockaddr *)&listen_addr, sizeof listen_addr);
    int e = errno;
    if (r < 0 && e == EINPROGRESS) {
        poll1(c2, POLLOUT, 2000);
        len = sizeof err;
        getsockopt(c2, SOL_SOCKET, SO_ERROR, &err, &len);
        printf("refused: SO_ERROR %s\n", en(err));
    } else {
        printf("refused: %d %s\n", r, en(e));
    }
    int c3 = socket(AF_INET, SOCK_STREAM, 0);
    printf("blocking connect refused: %s\n", res(connect(c3, (struct sockaddr *)&listen_addr, sizeof listen_addr)));
}

static void c_accept4(void) {
    int l = listener();
    int c = connect_to(&listen_addr);
    int s = accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    CHECK(s >= 0);
    printf("accept4 NONBLOCK|CLOEXEC: O_NONBLOCK=%d FD_CLOEXEC=%d\n", (fcntl(s, F_GETFL) & O_NONBLOCK) != 0,
           (fcntl(s, F_GETFD) & FD_CLOEXEC) != 0);
    char b[8];
    printf("recv: %s\n", res(recv(s, b, sizeof b, 0)));
    exchange(c, s);
    int c2 = connect_to(&listen_addr);
    struct sockaddr_in peer;
    socklen_t plen = sizeof peer;
    int s2 = accept4(l, (struct sockaddr *)&peer, &plen, 0);
    CHECK(s2 >= 0);
    printf("accept4 0: O_NONBLOCK=%d FD_CLOEXEC=%d addrlen=%u\n", (fcntl(s2, F_GETFL) & O_NONBLOCK) != 0,
           (fcntl(s2, F_GETFD) & FD_CLOEXEC) != 0, plen);
    exchange(c2, s2);
    int c3 = connect_to(&listen_addr);
    int s3 = accept4(l, NULL, NULL, SOCK_CLOEXEC);
    CHECK(s3 >= 0);
    printf("accept4 CLOEXEC: O_NONBLOCK=%d FD_CLOEXEC=%d\n", (fcntl(s3, F_GETFL) & O_NONBLOCK) != 0,
           (fcntl(s3, F_GETFD) & FD_CLOEXEC) != 0);
    exchange(c3, s3);
    printf("accept4 bad flags: %s\n", res(accept4(l, NULL, NULL, 0x1000)));
    /* A non-blocking listener with nobody waiting. */
    fcntl(l, F_SETFL, O_NONBLOCK);
    printf("accept empty: %s\n", res(accept(l, NULL, NULL)));
    sync_point();
}

static void c_self_connect(void) {
    int l = listener();
    /* One thread: connect, send before the server accepted, then accept. */
    int c = connect_to(&listen_addr);
    printf("send before accept: %s\n", res(send(c, "early", 5, 0)));
    int s = accept(l, NULL, NULL);
    CHECK(s >= 0);
    char b[8];
    read_all(s, b, 5);
    printf("server got: %.5s\n", b);
    write_all(s, "reply", 5);
    read_all(c, b, 5);
    printf("client got: %.5s\n", b);
    /* Several connects queued before any accept. */
    int cs[5], ss[5];
    for (int i = 0; i < 5; i++) {
        cs[i] = connect_to(&listen_addr);
        char m = (char)('0' + i);
        write_all(cs[i], &m, 1);
    }
    for (int i = 0; i < 5; i++) {
        ss[i] = accept(l, NULL, NULL);
        CHECK(ss[i] >= 0);
        read_all(ss[i], b, 1);
        printf("accepted %d got %c\n", i, b[0]);
        write_all(ss[i], b, 1);
        read_all(cs[i], b, 1);
    }
    sync_point();
}

int main(int argc, char **argv) {
    static const struct sem_case cases[] = {
        {"names", c_names},
        {"addresses", c_addresses},
        {"sockopts", c_sockopts},
        {"timeouts_before_connect", c_timeouts_before_connect},
        {"ioctls", c_ioctls},
        {"fcntl", c_fcntl},
        {"nb_connect", c_nb_connect},
        {"accept4", c_accept4},
        {"self_connect", c_self_connect},
        {NULL, NULL},
    };
    return run_case(cases, argc, argv);
}
