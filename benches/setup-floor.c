// setup-floor: the connection setup rate that libsdp's fd model allows at best, measured
// without libsdp. Each mode runs the loop of `sdp bench --only setup_rate` (connect, one
// byte each way, close; server pinned to CPU 0, client to CPU 1) with nothing in it but
// the kernel work the mode names: no policy, no SDP messages, no progress thread, no
// statistics, no identity checks, one unix channel per process pair made before the loop.
//
//   tcp      kernel TCP alone: the `base` leg of the bench.
//   pairs    tcp, and what the fd model adds to every connection (DESIGN §3): on each side
//            an app socketpair, whose bell end goes to the peer over the process pair's
//            channel (SCM_RIGHTS; the client's goes with its intent); the byte and its
//            answer travel through shared memory, each announced by a bell byte.
//   watched  pairs, and the two watches each side's progress thread keeps on a connection
//            (docs/ARCHITECTURE.md, the fd model 1 and 5): the peer's bell end for hang-up
//            (the peer's last close or death), its own bell end for stray writes.
//   model    watched, and the fd hygiene the library cannot skip: the client binds and
//            learns its port before its intent and connect (an intent must be recorded
//            before the server can accept, or a plain client is mistaken for an SDP one),
//            library descriptors move above the program's numbers, socketpair send
//            buffers shrink (the memory bound of 10,000 idle connections), and the app end
//            takes the program's descriptor number with dup3.
//   pooled   model, with socketpairs made ahead (their bell ends already moved high, their
//            buffers already small) and the library's own closes deferred, by a helper
//            thread on the same CPU: the most a library could take off the connection's
//            path by working ahead and behind it.
//   shared   not libsdp's model: one socketpair per connection whose two ends are the two
//            programs' descriptors, so that no bell end changes hands and the hang-up of a
//            side's own app end is its peer's close. Bells and a program's own stray writes
//            (stdio through an fdopen'd socket, bash's `echo >&3`) then share one byte
//            stream and cannot be told apart.
//
// Usage: setup-floor MODE CONNECTIONS PORT; prints `MODE conns_per_sec=N`. Exits non-zero
// if a call fails or an answer is wrong. benches/setup-floor.sh runs it repeatedly.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum mode { TCP, PAIRS, WATCHED, MODEL, POOLED, SHARED };
static const char *const NAMES[] = {"tcp", "pairs", "watched", "model", "pooled", "shared"};

static enum mode mode;

static void die(const char *what) {
    fprintf(stderr, "setup-floor %s: %s: %s\n", NAMES[mode], what, strerror(errno));
    exit(1);
}

static int ok(int r, const char *what) {
    if (r < 0) die(what);
    return r;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    ok(sched_setaffinity(0, sizeof set, &set), "sched_setaffinity");
}

// One message on the process pair's channel: a connection number, and a descriptor or none.
static void send_msg(int ch, uint32_t id, int fd) {
    char ctl[CMSG_SPACE(sizeof(int))] = {0};
    struct iovec io = {&id, sizeof id};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1};
    if (fd >= 0) {
        m.msg_control = ctl;
        m.msg_controllen = sizeof ctl;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    if (sendmsg(ch, &m, MSG_NOSIGNAL) != sizeof id) die("sendmsg");
}

static int recv_msg(int ch, uint32_t *id) {
    char ctl[CMSG_SPACE(sizeof(int))];
    struct iovec io = {id, sizeof *id};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = ctl,
                       .msg_controllen = sizeof ctl};
    if (recvmsg(ch, &m, MSG_CMSG_CLOEXEC) != sizeof *id) die("recvmsg");
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    if (!c) return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

static void ring(int fd) {
    if (write(fd, "", 1) != 1) die("ring");
}

static void wait_bell(int fd) {
    char b;
    if (read(fd, &b, 1) != 1) die("wait for the bell");
}

// --- the fd hygiene of `model` ---

static int move_high(int fd) {
    int h = ok(fcntl(fd, F_DUPFD_CLOEXEC, 400), "F_DUPFD_CLOEXEC");
    close(fd);
    return h;
}

static void small_buffer(int fd) {
    int one = 1;
    ok(setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &one, sizeof one), "SO_SNDBUF");
}

// The app end takes the program's number `*tcp`; the TCP socket moves high. Returns the app
// end's number.
static int swap_in(int app, int *tcp) {
    int shadow = move_high(*tcp);
    ok(dup3(app, *tcp, O_CLOEXEC), "dup3");
    close(app);
    int fd = *tcp;
    *tcp = shadow;
    return fd;
}

// --- the watches of `watched` and on ---

static int epfd = -1;

static void watch(int peer_bell, int own_bell) {
    struct epoll_event e = {.events = 0};
    ok(epoll_ctl(epfd, EPOLL_CTL_ADD, peer_bell, &e), "watch the peer's bell end");
    e.events = EPOLLIN | EPOLLET;
    ok(epoll_ctl(epfd, EPOLL_CTL_ADD, own_bell, &e), "watch our bell end");
}

static void unwatch(int peer_bell, int own_bell) {
    ok(epoll_ctl(epfd, EPOLL_CTL_DEL, peer_bell, NULL), "unwatch");
    ok(epoll_ctl(epfd, EPOLL_CTL_DEL, own_bell, NULL), "unwatch");
}

// --- `pooled`: socketpairs made ahead and closes deferred, by a helper thread ---

#define POOL 64
static int pool[POOL][2], npool, deferred[4 * POOL], ndeferred;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int helper_ev = -1;

static void *helper(void *arg) {
    pin(*(int *)arg);
    for (;;) {
        uint64_t v;
        if (read(helper_ev, &v, sizeof v) != sizeof v) die("helper read");
        for (;;) {
            int closing[4 * POOL];
            pthread_mutex_lock(&mu);
            int n = ndeferred, need = npool < POOL;
            memcpy(closing, deferred, n * sizeof(int));
            ndeferred = 0;
            pthread_mutex_unlock(&mu);
            for (int i = 0; i < n; i++) close(closing[i]);
            if (!need) break;
            int sp[2];
            ok(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp), "socketpair");
            sp[1] = move_high(sp[1]);
            small_buffer(sp[0]);
            small_buffer(sp[1]);
            pthread_mutex_lock(&mu);
            pool[npool][0] = sp[0];
            pool[npool][1] = sp[1];
            npool++;
            pthread_mutex_unlock(&mu);
        }
    }
    return NULL;
}

static void start_helper(int cpu) {
    static int c;
    c = cpu;
    helper_ev = ok(eventfd(1, EFD_CLOEXEC), "eventfd");
    pthread_t t;
    if (pthread_create(&t, NULL, helper, &c)) die("pthread_create");
}

static void kick_helper(void) {
    uint64_t one = 1;
    if (write(helper_ev, &one, sizeof one) != sizeof one) die("kick the helper");
}

// A socketpair: sp[0] the app end, sp[1] the bell end (for `model` and `pooled`, moved high,
// both with small send buffers).
static void new_pair(int sp[2]) {
    if (mode == POOLED) {
        pthread_mutex_lock(&mu);
        int have = npool > 0;
        if (have) {
            npool--;
            sp[0] = pool[npool][0];
            sp[1] = pool[npool][1];
        }
        int low = npool == POOL / 2;
        pthread_mutex_unlock(&mu);
        if (low || !have) kick_helper();
        if (have) return;
    }
    ok(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp), "socketpair");
    if (mode == MODEL || mode == POOLED) {
        sp[1] = move_high(sp[1]);
        small_buffer(sp[0]);
        small_buffer(sp[1]);
    }
}

static void lib_close(int fd) {
    if (mode == POOLED) {
        pthread_mutex_lock(&mu);
        int room = ndeferred < 4 * POOL;
        if (room) deferred[ndeferred++] = fd;
        pthread_mutex_unlock(&mu);
        if (room) return;
    }
    close(fd);
}

// --- the two ends ---

static volatile char *shm; // [0]: the client's byte, [1]: the server's answer

static void server(int l, int ch) {
    for (;;) {
        int s = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (s < 0) continue;
        char b;
        if (mode == TCP) {
            if (read(s, &b, 1) == 1 && write(s, &b, 1) != 1) die("write");
            close(s);
            continue;
        }
        uint32_t id;
        int peer = recv_msg(ch, &id); // the intent: the client's bell end (shared: its app end's peer)
        if (peer < 0) die("intent without a descriptor");
        if (mode == SHARED) {
            small_buffer(peer);
            int app = swap_in(peer, &s);
            send_msg(ch, id, -1); // the answer
            wait_bell(app);
            shm[1] = shm[0];
            ring(app);
            close(app);
            close(s);
            continue;
        }
        int sp[2];
        new_pair(sp); // sp[0]: our app end, sp[1]: our bell end
        int app = sp[0];
        if (mode == MODEL || mode == POOLED) {
            peer = move_high(peer);
            app = swap_in(sp[0], &s);
        }
        send_msg(ch, id, sp[1]); // the answer: our bell end
        if (mode >= WATCHED) watch(peer, sp[1]);
        wait_bell(app);
        shm[1] = shm[0];
        ring(peer);
        if (mode >= WATCHED) unwatch(peer, sp[1]);
        close(app);
        lib_close(sp[1]);
        lib_close(peer);
        close(s);
    }
}

static void client(const struct sockaddr_in *srv, int ch, int n) {
    for (int i = 0; i < n; i++) {
        char byte = 'a' + i % 26, b;
        int s = ok(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket");
        if (mode == TCP) {
            ok(connect(s, (const void *)srv, sizeof *srv), "connect");
            if (write(s, &byte, 1) != 1 || read(s, &b, 1) != 1) die("the byte");
            if (b != byte) {
                fprintf(stderr, "setup-floor tcp: wrong answer\n");
                exit(2);
            }
            close(s);
            continue;
        }
        int sp[2];
        new_pair(sp);
        int early = mode == MODEL || mode == POOLED || mode == SHARED;
        if (early) {
            struct sockaddr_in me = {.sin_family = AF_INET, .sin_addr = srv->sin_addr};
            socklen_t len = sizeof me;
            ok(bind(s, (const void *)&me, sizeof me), "bind");
            ok(getsockname(s, (void *)&me, &len), "getsockname");
            if (mode == SHARED) {
                small_buffer(sp[0]);
                small_buffer(sp[1]);
            }
            send_msg(ch, i, sp[1]); // the intent, before the connect
        }
        ok(connect(s, (const void *)srv, sizeof *srv), "connect");
        int app = sp[0], peer = -1;
        if (early) app = swap_in(sp[0], &s);
        else send_msg(ch, i, sp[1]);
        if (mode == SHARED) {
            close(sp[1]);
            uint32_t id;
            recv_msg(ch, &id);
        } else {
            uint32_t id;
            peer = recv_msg(ch, &id); // the server's bell end
            if (peer < 0) die("answer without a descriptor");
            if (mode == MODEL || mode == POOLED) peer = move_high(peer);
            if (mode >= WATCHED) watch(peer, sp[1]);
        }
        shm[0] = byte;
        ring(mode == SHARED ? app : peer);
        wait_bell(app);
        if (shm[1] != byte) {
            fprintf(stderr, "setup-floor %s: wrong answer\n", NAMES[mode]);
            exit(2);
        }
        if (mode >= WATCHED && mode != SHARED) unwatch(peer, sp[1]);
        close(app);
        if (mode != SHARED) {
            lib_close(sp[1]);
            lib_close(peer);
        }
        close(s);
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: setup-floor tcp|pairs|watched|model|pooled|shared CONNECTIONS PORT\n");
        return 1;
    }
    int m = -1;
    for (int i = 0; i <= SHARED; i++)
        if (!strcmp(argv[1], NAMES[i])) m = i;
    if (m < 0) {
        fprintf(stderr, "setup-floor: unknown mode %s\n", argv[1]);
        return 1;
    }
    mode = m;
    int n = atoi(argv[2]), port = atoi(argv[3]);
    int ch[2];
    ok(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ch), "socketpair");
    shm = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shm == MAP_FAILED) die("mmap");
    struct sockaddr_in srv = {.sin_family = AF_INET, .sin_port = htons(port),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int l = ok(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), "socket");
    int one = 1;
    ok(setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one), "SO_REUSEADDR");
    ok(bind(l, (const void *)&srv, sizeof srv), "bind the listener");
    ok(listen(l, 128), "listen");
    pid_t child = ok(fork(), "fork");
    if (child == 0) {
        close(ch[0]);
        pin(0);
        epfd = ok(epoll_create1(EPOLL_CLOEXEC), "epoll_create1");
        if (mode == POOLED) start_helper(0);
        server(l, ch[1]);
    }
    close(ch[1]);
    close(l);
    pin(1);
    epfd = ok(epoll_create1(EPOLL_CLOEXEC), "epoll_create1");
    if (mode == POOLED) start_helper(1);
    client(&srv, ch[0], n / 10); // warm-up, not timed
    double t0 = now();
    client(&srv, ch[0], n);
    double dt = now() - t0;
    printf("%s conns_per_sec=%.0f\n", NAMES[mode], n / dt);
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    return 0;
}
