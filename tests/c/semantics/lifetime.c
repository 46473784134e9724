/* Lifetime: dup/dup2 and close of one copy, fork with the child using the inherited
 * socket, a prefork server, a 64 MiB transfer both ways at once, 200 concurrent echoes. */
#include "sem.h"
#include <spawn.h>
#include <sys/epoll.h>

extern char **environ;

static int C, S;

static void c_dup(void) {
    fresh_pair(&C, &S);
    char b[16];
    int d1 = dup(C);
    int d2 = dup2(C, 100);
    printf("dup2 onto 100: %d\n", d2);
    printf("close original: %d\n", close(C));
    write_all(d1, "via dup", 7);
    read_all(S, b, 7);
    printf("server got: %.7s\n", b);
    write_all(S, "back", 4);
    read_all(d2, b, 4);
    printf("dup2 copy got: %.4s\n", b);
    printf("close dup: %d\n", close(d1));
    printf("server poll after closing two of three: %s\n", pollstr(poll1(S, POLLIN | POLLRDHUP, 100)));
    write_all(d2, "still", 5);
    read_all(S, b, 5);
    printf("server got: %.5s\n", b);
    /* dup2 onto an fd that is a live connection closes that one. */
    int c2, s2;
    fresh_pair(&c2, &s2);
    int d3 = dup(S);
    printf("dup2 over a connection: %d\n", dup2(d3, c2) == c2);
    printf("replaced connection's peer reads: %s\n", res(read(s2, b, sizeof b)));
    write_all(d2, "x", 1);
    read_all(c2, b, 1);
    printf("new meaning of that fd reads: %c\n", b[0]);
    sync_point();
    printf("close last copy: %d\n", close(d2));
    printf("server reads eof: %s\n", res(read(S, b, sizeof b)));
}

static void c_fork(void) {
    fresh_pair(&C, &S);
    int go[2];
    CHECK(pipe(go) == 0);
    pid_t k = fork();
    CHECK(k >= 0);
    if (k == 0) {
        close(S);
        close(go[1]);
        char b[32];
        read_all(go[0], b, 1); /* the parent closed its copy */
        write_all(C, "from child", 10);
        read_all(C, b, 5);
        printf("child got: %.5s\n", b);
        ssize_t n = read(C, b, sizeof b);
        printf("child reads eof: %s\n", res(n));
        _exit(0);
    }
    close(go[0]);
    printf("parent closes its copy: %d\n", close(C));
    write_all(go[1], "g", 1);
    char b[32];
    read_all(S, b, 10);
    printf("parent got: %.10s\n", b);
    sync_point();
    write_all(S, "reply", 5);
    shutdown(S, SHUT_WR);
    int st;
    CHECK(waitpid(k, &st, 0) == k);
    printf("child exit: %d\n", WEXITSTATUS(st));
    printf("parent reads eof: %s\n", res(read(S, b, sizeof b)));
}

static void worker(int l) {
    int ep = epoll_create1(0);
    CHECK(ep >= 0);
    struct epoll_event e = {.events = EPOLLIN, .data.fd = l};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, l, &e) == 0);
    for (;;) {
        struct epoll_event ev[16];
        int n = epoll_wait(ep, ev, 16, -1);
        if (n < 0 && errno == EINTR) continue;
        CHECK(n >= 0);
        for (int i = 0; i < n; i++) {
            int fd = ev[i].data.fd;
            if (fd == l) {
                int s = accept4(l, NULL, NULL, SOCK_NONBLOCK);
                if (s < 0) {
                    CHECK(errno == EAGAIN);
                    continue;
                }
                struct epoll_event se = {.events = EPOLLIN, .data.fd = s};
                CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &se) == 0);
                continue;
            }
            char b[256];
            ssize_t r = read(fd, b, sizeof b);
            if (r > 0) {
                write_all(fd, b, (size_t)r);
            } else if (r == 0 || errno != EAGAIN) {
                close(fd);
            }
        }
    }
}

static void c_prefork(void) {
    int l = listener();
    fcntl(l, F_SETFL, O_NONBLOCK);
    pid_t w[3];
    for (int i = 0; i < 3; i++) {
        w[i] = fork();
        CHECK(w[i] >= 0);
        if (w[i] == 0) {
            worker(l);
            _exit(0);
        }
    }
    close(l);
    int c[20];
    int ok = 0;
    for (int i = 0; i < 20; i++) {
        c[i] = connect_to(&listen_addr);
        char m[32], b[32];
        int len = snprintf(m, sizeof m, "client %d", i);
        write_all(c[i], m, (size_t)len);
        read_all(c[i], b, (size_t)len);
        ok += !memcmp(m, b, (size_t)len);
    }
    printf("echoed: %d of 20\n", ok);
    sync_point();
    for (int i = 0; i < 20; i++) {
        shutdown(c[i], SHUT_WR);
        char b[8];
        printf("client %d eof: %s\n", i, res(read(c[i], b, sizeof b)));
        close(c[i]);
    }
    for (int i = 0; i < 3; i++) kill(w[i], SIGTERM);
    int st, exited = 0;
    for (int i = 0; i < 3; i++) exited += waitpid(w[i], &st, 0) == w[i] && WIFSIGNALED(st);
    printf("workers stopped: %d\n", exited);
}

#define BIG (64u << 20)

struct pump {
    int fd;
    int write;
    uint32_t seed;
    uint64_t sum;
    size_t done;
};

static void *pump_fn(void *p) {
    struct pump *x = p;
    static __thread unsigned char buf[1 << 16];
    uint32_t v = x->seed;
    while (x->done < BIG) {
        size_t want = BIG - x->done < sizeof buf ? BIG - x->done : sizeof buf;
        if (x->write) {
            for (size_t i = 0; i < want; i++) {
                v = v * 1103515245u + 12345u;
                buf[i] = (unsigned char)(v >> 16);
                x->sum = x->sum * 31 + buf[i];
            }
            write_all(x->fd, buf, want);
            x->done += want;
        } else {
            ssize_t n = read(x->fd, buf, want);
            CHECK(n > 0);
            for (ssize_t i = 0; i < n; i++) x->sum = x->sum * 31 + buf[i];
            x->done += (size_t)n;
        }
    }
    return NULL;
}

static void c_large(void) {
    fresh_pair(&C, &S);
    struct pump p[4] = {
        {.fd = C, .write = 1, .seed = 1}, {.fd = S, .write = 0},
        {.fd = S, .write = 1, .seed = 2}, {.fd = C, .write = 0},
    };
    pthread_t t[4];
    for (int i = 0; i < 4; i++) t[i] = spawn(pump_fn, &p[i]);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    printf("client->server: %zu bytes checksum match=%d\n", p[1].done, p[0].sum == p[1].sum);
    printf("server->client: %zu bytes checksum match=%d\n", p[3].done, p[2].sum == p[3].sum);
    sync_point();
}

#define MANY 200

static void c_many(void) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    int l = listener();
    pid_t k = fork();
    CHECK(k >= 0);
    if (k == 0) {
        fcntl(l, F_SETFL, O_NONBLOCK);
        worker(l);
        _exit(0);
    }
    close(l);
    static int c[MANY];
    for (int i = 0; i < MANY; i++) c[i] = connect_to(&listen_addr);
    for (int i = 0; i < MANY; i++) {
        char m[32];
        int len = snprintf(m, sizeof m, "message %d", i);
        write_all(c[i], m, (size_t)len);
    }
    int ok = 0;
    for (int i = 0; i < MANY; i++) {
        char m[32], b[32];
        int len = snprintf(m, sizeof m, "message %d", i);
        read_all(c[i], b, (size_t)len);
        ok += !memcmp(m, b, (size_t)len);
    }
    printf("echoed: %d of %d\n", ok, MANY);
    sync_point();
    int eof = 0;
    for (int i = 0; i < MANY; i++) {
        shutdown(c[i], SHUT_WR);
        char b[8];
        eof += read(c[i], b, sizeof b) == 0;
        close(c[i]);
    }
    printf("closed by server after our shutdown: %d\n", eof);
    kill(k, SIGTERM);
    waitpid(k, NULL, 0);
}


/* dup3 with O_CLOEXEC gives a working copy that is close-on-exec. */
static void c_dup3(void) {
    fresh_pair(&C, &S);
    int d = dup3(C, 101, O_CLOEXEC);
    printf("dup3 onto 101: %d cloexec=%d\n", d, (fcntl(101, F_GETFD) & FD_CLOEXEC) != 0);
    printf("dup3 onto itself: %s\n", res(dup3(C, C, 0)));
    close(C);
    char b[8];
    write_all(101, "dup3", 4);
    read_all(S, b, 4);
    printf("server got: %.4s\n", b);
    sync_point();
    close(101);
    printf("server reads eof: %s\n", res(read(S, b, sizeof b)));
}

#define UNSENT (8u << 20)

/* A process that exits right after its last write: every byte still reaches the peer. */
static void c_exit_unsent(void) {
    fresh_pair(&C, &S);
    sync_point();
    pid_t k = fork();
    CHECK(k >= 0);
    if (k == 0) {
        close(S);
        static unsigned char buf[1 << 16];
        uint32_t v = 7;
        for (size_t done = 0; done < UNSENT; done += sizeof buf) {
            for (size_t i = 0; i < sizeof buf; i++) {
                v = v * 1103515245u + 12345u;
                buf[i] = (unsigned char)(v >> 16);
            }
            write_all(C, buf, sizeof buf);
        }
        exit(0); /* no close, no shutdown: exit itself must deliver */
    }
    close(C);
    static unsigned char buf[1 << 16];
    uint32_t v = 7;
    size_t got = 0;
    int same = 1;
    for (;;) {
        ssize_t n = read(S, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        for (ssize_t i = 0; i < n; i++) {
            v = v * 1103515245u + 12345u;
            same &= buf[i] == (unsigned char)(v >> 16);
        }
        got += (size_t)n;
    }
    int st;
    CHECK(waitpid(k, &st, 0) == k);
    printf("peer got %zu of %u bytes, all in order: %d, then eof\n", got, UNSENT, same);
}

/* A process that exits with bytes it never read (its own connection, made after any fork)
 * resets the connection, as its last close would: the peer's read fails with ECONNRESET.
 * And one that exits with its answer still in a stdio stream on the socket (fdopen "w", no
 * fclose): the C library flushes the stream after the atexit handlers, and the peer gets
 * the answer, then end of stream. Until 2026-11-27 the first peer read end of stream, and
 * the second lost the answer with the process. */
static void c_exit_unread(void) {
    for (int stdio = 0; stdio < 2; stdio++) {
        int l = listener();
        int go[2];
        CHECK(pipe(go) == 0);
        pid_t k = fork();
        CHECK(k >= 0);
        if (k == 0) {
            close(go[1]);
            int c = connect_to(&listen_addr);
            write_all(c, "hi", 2);
            char b;
            CHECK(read(go[0], &b, 1) == 1);
            if (stdio) {
                FILE *f = fdopen(c, "w");
                CHECK(f != NULL);
                fprintf(f, "an answer through stdio\n");
            } else {
                int n = 0;
                while (ioctl(c, FIONREAD, &n) == 0 && n == 0) sleep_ms(5);
            }
            exit(0);
        }
        close(go[0]);
        int s = accept(l, NULL, NULL);
        CHECK(s >= 0);
        close(l);
        char b[64];
        read_all(s, b, 2);
        if (!stdio) {
            write_all(s, "0123456789", 10);
            sync_point();
        }
        CHECK(write(go[1], "g", 1) == 1);
        if (stdio) {
            size_t got = 0;
            ssize_t n;
            while ((n = read(s, b + got, sizeof b - 1 - got)) > 0) got += (size_t)n;
            b[got] = 0;
            printf("the exited peer's stdio answer: \"%.*s\", then %s\n", (int)(got ? got - 1 : 0),
                   b, res(n));
        } else {
            printf("read after the peer exited with bytes unread: %s\n", res(read(s, b, sizeof b)));
        }
        int st;
        CHECK(waitpid(k, &st, 0) == k);
        close(s);
        close(go[1]);
    }
}

/* fclose of a stdio stream opened for writing on the socket: the peer reads what it wrote,
 * then end of stream, and the number is free for the program's next file. */
static void c_fclose(void) {
    fresh_pair(&C, &S);
    int num = C;
    FILE *f = fdopen(C, "w");
    CHECK(f != NULL);
    fprintf(f, "through stdio\n");
    sync_point();
    CHECK(fclose(f) == 0);
    char b[64];
    size_t got = 0;
    ssize_t n;
    while ((n = read(S, b + got, sizeof b - 1 - got)) > 0) got += (size_t)n;
    printf("peer read \"%.*s\", then %s\n", (int)(got ? got - 1 : 0), b, res(n));
    char path[] = "/tmp/sem-fclose-XXXXXX";
    int t = mkstemp(path);
    CHECK(t >= 0);
    /* Lower free numbers are taken first, so that a file gets the socket's old number. */
    int held[64], nheld = 0;
    while (t < num && nheld < 64) {
        held[nheld++] = t;
        t = open(path, O_RDWR);
        CHECK(t >= 0);
    }
    unlink(path);
    for (int i = 0; i < nheld; i++) close(held[i]);
    printf("the next file takes the number: %d\n", t == num);
    ssize_t w = write(t, "x", 1);
    printf("and writes to the file: %s size=%ld\n", res(w), (long)lseek(t, 0, SEEK_END));
    close(t);
    close(S);
}

/* dup2 over a socket registered in an epoll set: the set forgets it with the file, as
 * for its close, also while the connection still delivers what the socket queued (it
 * lingers) and its peer writes more. */
static void c_dup2_epoll(void) {
    fresh_pair(&C, &S);
    int ep = epoll_create1(0);
    CHECK(ep >= 0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 42};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, S, &ev) == 0);
    write_all(C, "read", 4);
    struct epoll_event out[4];
    printf("before: %d event(s)\n", epoll_wait(ep, out, 4, 1000));
    char b[4];
    read_all(S, b, 4);
    static char chunk[65536];
    fill_until_eagain(S, chunk, sizeof chunk);
    sync_point();
    int null = open("/dev/null", O_RDWR);
    CHECK(null >= 0);
    CHECK(dup2(null, S) == S);
    close(null);
    write_all(C, "late", 4);
    printf("after a dup2 over it: %d event(s)\n", epoll_wait(ep, out, 4, 300));
    close(S);
    close(C);
    close(ep);
}

/* Reads what `s` delivers until end of stream, and says it. */
static void drain_and_say(const char *who, int s) {
    char b[256];
    size_t got = 0;
    ssize_t n;
    while ((n = read(s, b + got, sizeof b - 1 - got)) > 0 || (n < 0 && errno == EINTR))
        if (n > 0) got += (size_t)n;
    b[got] = 0;
    printf("server got from %s: \"%s\", then %s\n", who, b, res(n));
    close(s);
}

/* A client that writes and then closes, or exits, before the server accepted: its bytes still
 * reach the server, then end of stream. Over SDP they wait in the client's library while the
 * connection is pending, so the close and the exit must hand them to the kernel. */
static void c_gone_before_accept(void) {
    int l = listener();
    int c = connect_to(&listen_addr);
    write_all(c, "written, then closed", 20);
    printf("close: %d\n", close(c));
    drain_and_say("a closed socket", accept(l, NULL, NULL));
    const char *how[] = {"exit", "_exit"};
    for (int i = 0; i < 2; i++) {
        pid_t k = fork();
        CHECK(k >= 0);
        if (k == 0) {
            close(l);
            int c2 = connect_to(&listen_addr);
            write_all(c2, "written, then exited", 20);
            if (i == 0) exit(0);
            _exit(0);
        }
        int st;
        CHECK(waitpid(k, &st, 0) == k);
        drain_and_say(how[i], accept(l, NULL, NULL));
    }
    close(l);
    fresh_pair(&C, &S);
    sync_point();
}

/* A reset SDP connection polls IN and HUP but not ERR: an AF_UNIX app end cannot be made to
 * show POLLERR from outside (docs/ARCHITECTURE.md). The reads that follow are TCP's. */
static int no_err(int r) { return r > 0 ? r & ~POLLERR : r; }

/* SO_LINGER with a zero timeout: close resets the connection. */
/* What a socket does once its reset was reported: end of stream, EPIPE, no pending error. */
static void after_reset(int s) {
    char b[8];
    printf("then: %s\n", res(read(s, b, sizeof b)));
    printf("then send: %s\n", res(send(s, "x", 1, MSG_NOSIGNAL)));
    int err = -1;
    socklen_t len = sizeof err;
    CHECK(getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) == 0);
    printf("then SO_ERROR: %s\n", err ? strerrorname_np(err) : "0");
}

static void c_linger0(void) {
    fresh_pair(&C, &S);
    sync_point();
    struct linger lg = {1, 0};
    CHECK(setsockopt(C, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) == 0);
    close(C);
    char b[8];
    printf("peer poll: %s\n", pollstr(no_err(poll1(S, POLLIN, 5000))));
    printf("peer reads: %s\n", res(read(S, b, sizeof b)));
    after_reset(S);
}

/* close with unread bytes resets the connection instead of ending it. */
static void c_unread_close(void) {
    fresh_pair(&C, &S);
    write_all(S, "never read", 10);
    printf("data arrived: %s\n", pollstr(poll1(C, POLLIN, 5000)));
    sync_point();
    close(C);
    char b[8];
    printf("peer poll: %s\n", pollstr(no_err(poll1(S, POLLIN, 5000))));
    printf("peer reads: %s\n", res(read(S, b, sizeof b)));
    after_reset(S);
}

/* daemon(): the detached grandchild keeps using the connection its parent made. */
static void c_daemon(void) {
    fresh_pair(&C, &S);
    sync_point();
    pid_t k = fork();
    CHECK(k >= 0);
    if (k == 0) {
        close(S);
        if (daemon(1, 1) != 0) _exit(9);
        char b[16];
        write_all(C, "from daemon", 11);
        read_all(C, b, 5);
        printf("daemon got: %.5s\n", b);
        exit(0);
    }
    close(C);
    int st;
    CHECK(waitpid(k, &st, 0) == k);
    printf("daemon() parent exit: %d\n", WEXITSTATUS(st));
    char b[16];
    read_all(S, b, 11);
    printf("server got: %.11s\n", b);
    write_all(S, "reply", 5);
    printf("server reads eof after the daemon exits: %s\n", res(read(S, b, sizeof b)));
}

/* inetd style: the accepting child puts the connection on stdin and stdout and execs cat. */
static void c_inetd(void) {
    int l = listener();
    pid_t k = fork();
    CHECK(k >= 0);
    if (k == 0) {
        int s = accept(l, NULL, NULL);
        CHECK(s >= 0);
        CHECK(dup2(s, 0) == 0 && dup2(s, 1) == 1);
        close(s);
        close(l);
        char *argv[] = {"cat", NULL};
        execv("/bin/cat", argv);
        _exit(127);
    }
    close(l);
    int c = connect_to(&listen_addr);
    const char *m = "hello from an inetd client\n";
    write_all(c, m, strlen(m));
    char b[64];
    read_all(c, b, strlen(m));
    printf("echoed by cat: %d\n", !memcmp(b, m, strlen(m)));
    sync_point();
    shutdown(c, SHUT_WR);
    printf("eof after cat exits: %s\n", res(read(c, b, sizeof b)));
    int st;
    CHECK(waitpid(k, &st, 0) == k);
    printf("cat exit: %d\n", WEXITSTATUS(st));
    close(c);
}

/* The ways a launcher hands an accepted connection to a program as its stdin and stdout,
 * besides fork + dup2 + execv (c_inetd): execl, execlp and execle (glibc's call its internal
 * execve, no preload sees it), posix_spawnp with adddup2 actions (the child runs no hook at
 * all), and a child that closes every other descriptor first with closefrom or close_range
 * (Python's subprocess does, and took the library's own descriptors with it). `head -c N`
 * echoes one line back; the client then sees end of stream. Each launch must echo. */
enum launch { L_EXECL, L_EXECLP, L_EXECLE, L_SPAWN, L_CLOSEFROM, L_CLOSE_RANGE, L_COUNT };
static const char *launch_name[] = {"execl", "execlp", "execle", "posix_spawnp",
                                    "closefrom + execv", "close_range + execv"};

static pid_t launch_head(enum launch how, int s, const char *count) {
    char *argv[] = {"head", "-c", (char *)count, NULL};
    if (how == L_SPAWN) {
        posix_spawn_file_actions_t fa;
        CHECK(posix_spawn_file_actions_init(&fa) == 0);
        CHECK(posix_spawn_file_actions_adddup2(&fa, s, 0) == 0);
        CHECK(posix_spawn_file_actions_adddup2(&fa, s, 1) == 0);
        pid_t k;
        CHECK(posix_spawnp(&k, "head", &fa, NULL, argv, environ) == 0);
        posix_spawn_file_actions_destroy(&fa);
        return k;
    }
    pid_t k = fork();
    CHECK(k >= 0);
    if (k > 0) return k;
    CHECK(dup2(s, 0) == 0 && dup2(s, 1) == 1);
    switch (how) {
    case L_EXECL: execl("/usr/bin/head", "head", "-c", count, (char *)NULL); break;
    case L_EXECLP: execlp("head", "head", "-c", count, (char *)NULL); break;
    case L_EXECLE: execle("/usr/bin/head", "head", "-c", count, (char *)NULL, environ); break;
    case L_CLOSEFROM:
        closefrom(3);
        execv("/usr/bin/head", argv);
        break;
    case L_CLOSE_RANGE:
        CHECK(close_range(3, ~0U, 0) == 0);
        execv("/usr/bin/head", argv);
        break;
    default: break;
    }
    _exit(127);
}

static void c_launchers(void) {
    int l = listener();
    for (int how = 0; how < L_COUNT; how++) {
        int c = connect_to(&listen_addr);
        int s = accept(l, NULL, NULL);
        CHECK(s >= 0);
        exchange(c, s);
        char m[64];
        int len = snprintf(m, sizeof m, "through %s\n", launch_name[how]);
        char count[16];
        snprintf(count, sizeof count, "%d", len);
        pid_t k = launch_head((enum launch)how, s, count);
        close(s);
        write_all(c, m, (size_t)len);
        char b[64];
        read_all(c, b, (size_t)len);
        printf("%s echoed: %d\n", launch_name[how], !memcmp(b, m, (size_t)len));
        if (how == L_COUNT - 1) sync_point();
        printf("%s then end of stream: %s\n", launch_name[how], res(read(c, b, sizeof b)));
        int st;
        CHECK(waitpid(k, &st, 0) == k);
        printf("%s exit: %d\n", launch_name[how], WEXITSTATUS(st));
        close(c);
    }
    close(l);
}

/* A process that closes every descriptor it did not open, one at a time, then with
 * close_range and closefrom, while it holds a connection: the connection keeps working, and
 * each close of a number the program never opened fails with EBADF as without the library. */
static void c_close_all_others(void) {
    fresh_pair(&C, &S);
    int hi = C > S ? C : S;
    int closed = 0, ebadf = 0;
    for (int fd = 3; fd < 4096; fd++) {
        if (fd == C || fd == S) continue;
        if (close(fd) == 0) closed++;
        else if (errno == EBADF) ebadf++;
    }
    printf("closed one by one: %d, EBADF: %d\n", closed, ebadf);
    exchange(C, S);
    printf("exchange after the loop: ok\n");
    printf("close_range above: %d\n", close_range((unsigned)hi + 1, ~0U, 0));
    exchange(C, S);
    closefrom(hi + 1);
    exchange(C, S);
    printf("exchange after close_range and closefrom: ok\n");
    sync_point();
    char b[1 << 16];
    memset(b, 'z', sizeof b);
    write_all(C, b, sizeof b);
    read_all(S, b, sizeof b);
    close(C);
    printf("server reads eof: %s\n", res(read(S, b, sizeof b)));
    close(S);
}

/* A server exec'd on a listening socket it inherited from this process, which published
 * the socket's beacon and keeps the listener: an SDP client's connection reaches a process
 * that holds no intent for it and is told to keep TCP while it is pending. The client
 * wrote its request while pending and waits for the answer with poll, ppoll, select or
 * pselect: its fd number is re-pointed to the TCP socket under the wait, which must still
 * see the answer (before, it slept until its timeout). Each answer must come within 1 s of a
 * 5 s wait. The program re-runs itself as the echo server (argv[2] = the listener's fd). */
static void inherited_echo(int l) {
    for (;;) {
        int s = accept(l, NULL, NULL);
        if (s < 0) _exit(0);
        char b[4];
        read_all(s, b, 4);
        write_all(s, b, 4);
        /* Left open: the next client is accepted while this one is still connected. */
    }
}

static const char *self_exe;

static void c_declined_wait(void) {
    int l = listener();
    int fl = fcntl(l, F_GETFD);
    CHECK(fl >= 0 && fcntl(l, F_SETFD, fl & ~FD_CLOEXEC) == 0);
    pid_t k = fork();
    CHECK(k >= 0);
    if (k == 0) {
        char fdarg[16];
        snprintf(fdarg, sizeof fdarg, "%d", l);
        execl(self_exe, self_exe, "inherited_echo", fdarg, (char *)NULL);
        _exit(127);
    }
    static const char *how[] = {"poll", "ppoll", "select", "pselect"};
    int conns[4];
    for (int i = 0; i < 4; i++) {
        int c = connect_to(&listen_addr);
        conns[i] = c;
        write_all(c, "ping", 4);
        double t0 = now_ms();
        int r = -1;
        if (i < 2) {
            struct pollfd p = {.fd = c, .events = POLLIN};
            struct timespec ts = {.tv_sec = 5};
            r = i == 0 ? poll(&p, 1, 5000) : ppoll(&p, 1, &ts, NULL);
        } else {
            fd_set rs;
            FD_ZERO(&rs);
            FD_SET(c, &rs);
            struct timeval tv = {.tv_sec = 5};
            struct timespec ts = {.tv_sec = 5};
            r = i == 2 ? select(c + 1, &rs, NULL, NULL, &tv) : pselect(c + 1, &rs, NULL, NULL, &ts, NULL);
            if (r == 1 && !FD_ISSET(c, &rs)) r = -2;
        }
        char b[4];
        read_all(c, b, 4);
        printf("%s: ready %d, answered within 1 s: %d, echo: %d\n", how[i], r, now_ms() - t0 < 1000,
               !memcmp(b, "ping", 4));
    }
    sync_point();
    for (int i = 0; i < 4; i++) close(conns[i]);
    kill(k, SIGKILL);
    waitpid(k, NULL, 0);
    close(l);
}

/* A line protocol served through stdio: the server reads the accepted socket with fgets on
 * an fdopen'ed stream and answers with fprintf on another (the C library's internal read and
 * write, which no preload sees). Before, fgets read the app end's bell bytes. */
static void c_stdio(void) {
    fresh_pair(&C, &S);
    write_all(C, "HELO one\nHELO two\n", 18);
    FILE *in = fdopen(S, "r");
    FILE *out = fdopen(dup(S), "w");
    CHECK(in && out);
    char line[64];
    for (int i = 0; i < 2; i++) {
        CHECK(fgets(line, sizeof line, in) != NULL);
        printf("server read: %s", line);
        fprintf(out, "250 %d\n", i);
        fflush(out);
    }
    char b[12];
    read_all(C, b, sizeof b);
    printf("client read: %.12s", b);
    struct sockaddr_in p;
    socklen_t len = sizeof p;
    CHECK(getpeername(fileno(in), (struct sockaddr *)&p, &len) == 0);
    printf("server's peer family is AF_INET: %d\n", p.sin_family == AF_INET);
    sync_point();
    fclose(out);
    fclose(in);
    printf("client reads eof: %s\n", res(read(C, b, sizeof b)));
    close(C);
}

/* A process that execs right after its last write, its socket closed by the exec
 * (SOCK_CLOEXEC), and one that closes its socket first: every byte send took still reaches
 * the peer, as the kernel delivers them over TCP. Over SDP the bytes the peer's window did
 * not take yet wait in the library's memory, which the exec replaces. */
static void c_exec_unsent(void) {
    for (int closed_first = 0; closed_first < 2; closed_first++) {
        int l = listener();
        int c = connect_to(&listen_addr);
        int s = accept(l, NULL, NULL);
        CHECK(s >= 0);
        close(l);
        exchange(c, s);
        if (closed_first == 0) sync_point();
        int p[2];
        CHECK(pipe(p) == 0);
        pid_t k = fork();
        CHECK(k >= 0);
        if (k == 0) {
            close(s);
            close(p[0]);
            CHECK(fcntl(c, F_SETFD, FD_CLOEXEC) == 0);
            CHECK(fcntl(c, F_SETFL, O_NONBLOCK) == 0);
            static char chunk[1 << 16];
            memset(chunk, 'e', sizeof chunk);
            size_t total = 0;
            ssize_t n;
            while ((n = send(c, chunk, sizeof chunk, 0)) > 0) total += (size_t)n;
            CHECK(write(p[1], &total, sizeof total) == (ssize_t)sizeof total);
            if (closed_first) close(c);
            char *argv[] = {"true", NULL};
            execv("/bin/true", argv);
            _exit(127);
        }
        close(c);
        close(p[1]);
        size_t total = 0;
        CHECK(read(p[0], &total, sizeof total) == (ssize_t)sizeof total);
        close(p[0]);
        sleep_ms(200); /* the exec is done: nothing of the writer's process is left */
        static char buf[1 << 16];
        size_t got = 0;
        ssize_t n;
        while ((n = read(s, buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR))
            if (n > 0) got += (size_t)n;
        int st;
        CHECK(waitpid(k, &st, 0) == k);
        printf("%s: peer got all the writer's bytes: %d (some: %d), then %s\n",
               closed_first ? "close, then exec" : "exec", got == total, total > 0, res(n));
        close(s);
    }
}

int main(int argc, char **argv) {
    static const struct sem_case cases[] = {
        {"dup", c_dup},
        {"fork", c_fork},
        {"prefork", c_prefork},
        {"large", c_large},
        {"many", c_many},
        {"dup3", c_dup3},
        {"exit_unsent", c_exit_unsent},
        {"exit_unread", c_exit_unread},
        {"fclose", c_fclose},
        {"dup2_epoll", c_dup2_epoll},
        {"exec_unsent", c_exec_unsent},
        {"gone_before_accept", c_gone_before_accept},
        {"linger0", c_linger0},
        {"unread_close", c_unread_close},
        {"daemon", c_daemon},
        {"inetd", c_inetd},
        {"launchers", c_launchers},
        {"close_all_others", c_close_all_others},
        {"declined_wait", c_declined_wait},
        {"stdio", c_stdio},
        {NULL, NULL},
    };
    self_exe = argv[0];
    if (argc == 3 && !strcmp(argv[1], "inherited_echo")) inherited_echo(atoi(argv[2]));
    return run_case(cases, argc, argv);
}
