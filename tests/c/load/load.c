/* Load (issue 8, item 3), driven by tests/load.rs:
 *
 *   load server PORT [WORKERS [MODE [MAX]]]
 *                                epoll server on PORT; MODE `echo` (the default) echoes until
 *                                the client closes, `once` echoes one 8-byte request and closes
 *                                first (see serve); WORKERS > 1: a prefork server, one listener
 *                                and WORKERS processes each with its own epoll loop on it; MAX:
 *                                connections one process holds at most (0: no limit)
 *   load conns PORT N ROUNDS     N concurrent connections to PORT, ROUNDS echo round trips on
 *                                every one while all are open; SYNC; ROUNDS more; closes all
 *   load churn PORT N PROCS      N short connections (connect, 8-byte request and echo, the
 *                                server closes) from PROCS processes at once; every 1000th is
 *                                kept open until the SYNC at the end
 *   load threads PORT            64 threads on 8 shared connections (4 senders, 4 receivers per
 *                                connection), records checked for integrity; SYNC
 *   load latency PORT ITER       ITER ping-pongs of 64 bytes on one connection; prints p50/p99
 *
 * Every mode prints what it checked (counts that must be exact) and, on lines starting with
 * "figure:", the timings the harness reports without asserting them. */
#include "../semantics/sem.h"
#include <sys/epoll.h>
#include <sys/mman.h>

static void raise_nofile(rlim_t want) {
    struct rlimit r;
    CHECK(getrlimit(RLIMIT_NOFILE, &r) == 0);
    if (r.rlim_max < want) {
        struct rlimit w = {want, want};
        if (setrlimit(RLIMIT_NOFILE, &w) == 0) return;
    }
    r.rlim_cur = r.rlim_max < want ? r.rlim_max : want;
    CHECK(setrlimit(RLIMIT_NOFILE, &r) == 0);
}

static struct sockaddr_in to_port(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

/* ------------------------------------------------------------------------------------------ */

/* Server modes (MODE). Echo: whatever a connection sends comes back, until the client closes.
 * Once (HTTP/1.0 style): the first 8 bytes of a connection are a request; the server echoes
 * them and closes first, so the TIME_WAIT of the short connection stays on the server's side
 * (its listening port) and not on one of the client's ephemeral ports; a request with bit 63
 * set asks to keep the connection (it is then served as in echo mode). */
#define KEEP (1ull << 63)

struct req {
    uint8_t got; /* bytes of the request read so far; 8: served, echo from now on */
    uint64_t tag;
};

static void drop_conn(int ep, int fd, int *open) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    (*open)--;
}

/* One epoll loop on the listener `l`: one worker of a prefork server, or the whole server.
 * `max` (0: no limit) is how many connections this process may hold: a worker at its limit
 * stops watching the listener and leaves new connections to its siblings (as nginx's
 * worker_connections), instead of failing at accept when its descriptors run out. */
static void serve(int l, int once, int exclusive, int max) {
    int ep = epoll_create1(0);
    CHECK(ep >= 0);
    struct epoll_event e = {.events = EPOLLIN | (exclusive ? EPOLLEXCLUSIVE : 0), .data.fd = l};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, l, &e) == 0);
    int watching = 1, open = 0;
    struct rlimit r;
    CHECK(getrlimit(RLIMIT_NOFILE, &r) == 0);
    struct req *rq = once ? calloc((size_t)r.rlim_cur, sizeof *rq) : NULL;
    CHECK(!once || rq != NULL);
    static struct epoll_event ev[512];
    static char b[1 << 16];
    for (;;) {
        if (max > 0 && watching != (open < max)) {
            watching = open < max;
            if (watching) CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, l, &e) == 0);
            else CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, l, NULL) == 0);
        }
        int n = epoll_wait(ep, ev, 512, -1);
        if (n < 0 && errno == EINTR) continue;
        CHECK(n >= 0);
        for (int i = 0; i < n; i++) {
            int fd = ev[i].data.fd;
            if (fd == l) {
                /* A batch per wake-up: the siblings take the rest. */
                for (int k = 0; k < 64 && (max <= 0 || open < max); k++) {
                    int s = accept4(l, NULL, NULL, 0);
                    if (s < 0) {
                        if (errno == EMFILE || errno == ENFILE) {
                            fprintf(stderr, "accept: %s\n", strerror(errno));
                            exit(3); /* the harness sizes the test to fit: say so, loudly */
                        }
                        break;
                    }
                    open++;
                    if (once) rq[s] = (struct req){0, 0};
                    struct epoll_event se = {.events = EPOLLIN, .data.fd = s};
                    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &se) == 0);
                }
                continue;
            }
            if (once && rq[fd].got < 8) {
                struct req *q = &rq[fd];
                ssize_t r = read(fd, (char *)&q->tag + q->got, 8u - q->got);
                if (r <= 0) {
                    drop_conn(ep, fd, &open);
                    continue;
                }
                q->got += (uint8_t)r;
                if (q->got < 8) continue;
                write_all(fd, &q->tag, 8);
                if (!(q->tag & KEEP)) drop_conn(ep, fd, &open);
                continue;
            }
            ssize_t r = read(fd, b, sizeof b);
            if (r <= 0) {
                drop_conn(ep, fd, &open);
                continue;
            }
            /* Echo: small messages fit the send buffer; block for the rest. */
            write_all(fd, b, (size_t)r);
        }
    }
}

/* The server: one listening socket. With WORKERS > 1 it is a prefork server (as nginx): the
 * listener is created before the fork and each worker runs its own epoll loop on the inherited
 * socket, taking its share of the connections (EPOLLEXCLUSIVE wakes one worker per arrival);
 * the master only waits. A worker that dies ends the server with its status. */
static void server(int port, int workers, int once, int max) {
    raise_nofile(400000);
    int l = listener_on(AF_INET, (uint16_t)port);
    CHECK(listen(l, 4096) == 0);
    int fl = fcntl(l, F_GETFL);
    CHECK(fcntl(l, F_SETFL, fl | O_NONBLOCK) == 0);
    if (workers <= 1) serve(l, once, 0, max);
    for (int i = 0; i < workers; i++) {
        pid_t w = fork();
        CHECK(w >= 0);
        if (w == 0) {
            serve(l, once, 1, max);
            _exit(0);
        }
    }
    for (;;) {
        int st;
        pid_t w = wait(&st);
        if (w < 0 && errno == EINTR) continue;
        CHECK(w > 0);
        fprintf(stderr, "worker %d ended: status %d\n", (int)w, st);
        exit(3);
    }
}

/* ------------------------------------------------------------------------------------------ */

static int echo8(int c, uint64_t tag) {
    uint64_t back = 0;
    if (write(c, &tag, 8) != 8) return 0;
    if (recv(c, &back, 8, MSG_WAITALL) != 8) return 0;
    return back == tag;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* p50/p99 of ITER 64-byte ping-pongs on one fresh connection, in microseconds. */
static void pingpong(struct sockaddr_in *a, int iter, const char *label) {
    int c = connect_to(a);
    int one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    double *t = calloc((size_t)iter, sizeof *t);
    CHECK(t != NULL);
    char m[64];
    memset(m, 'p', sizeof m);
    int ok = 0;
    for (int i = 0; i < iter; i++) {
        double s = now_ms();
        write_all(c, m, sizeof m);
        ok += recv(c, m, sizeof m, MSG_WAITALL) == (ssize_t)sizeof m;
        t[i] = (now_ms() - s) * 1000.0;
    }
    qsort(t, (size_t)iter, sizeof *t, cmp_double);
    printf("ping-pongs %s: %d of %d\n", label, ok, iter);
    printf("figure: latency %s p50 %.1f us p99 %.1f us\n", label, t[iter / 2],
           t[(int)(iter * 0.99)]);
    free(t);
    close(c);
}

static void conns(int port, int n, int rounds) {
    raise_nofile(400000);
    struct sockaddr_in a = to_port(port);
    int *c = calloc((size_t)n, sizeof *c);
    CHECK(c != NULL);
    double t0 = now_ms();
    int opened = 0;
    long ok = 0;
    /* The first round trip of each connection right after its connect: the server accepts as
     * fast as it can, and a client that opened hundreds of connections without waiting would
     * leave them unaccepted past libsdp's 2 s pending budget (they would go TCP). */
    for (int i = 0; i < n; i++) {
        c[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (c[i] < 0 || connect(c[i], (struct sockaddr *)&a, sizeof a)) {
            fprintf(stderr, "connection %d: %s\n", i, strerror(errno));
            break;
        }
        ok += echo8(c[i], (uint64_t)i);
        opened++;
    }
    double t1 = now_ms();
    for (int r = 1; r < rounds; r++)
        for (int i = 0; i < opened; i++) ok += echo8(c[i], ((uint64_t)r << 32) | (uint64_t)i);
    double t2 = now_ms();
    printf("open: %d of %d\n", opened, n);
    printf("round trips: %ld of %ld\n", ok, (long)opened * rounds);
    printf("figure: %d connects with a round trip each in %.0f ms (%.0f/s); %ld more round trips in %.0f ms\n",
           opened, t1 - t0, opened * 1000.0 / (t1 - t0), (long)opened * (rounds - 1), t2 - t1);
    sync_point();
    /* The same traffic again, now while the harness measures latency on another connection. */
    ok = 0;
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < opened; i++) ok += echo8(c[i], ((uint64_t)r << 32) | (uint64_t)i);
    printf("round trips after the sync: %ld of %ld\n", ok, (long)opened * rounds);
    for (int i = 0; i < opened; i++) close(c[i]);
    free(c);
}

/* ------------------------------------------------------------------------------------------ */

/* Connections i = first, first + step, ... below n, each: connect, an 8-byte request, its
 * echo, then the server's close (read gives 0), then ours. Every 1000th asks the server to
 * keep it and stays open (up to 256 per process) until the release. */
static void churn_part(const struct sockaddr_in *a, int first, int step, int n, long *ok,
                      long *failed, int *kept, int *nkept) {
    for (int i = first; i < n; i += step) {
        int keep = i % 1000 == 999 && *nkept < 256;
        uint64_t tag = (uint64_t)i | (keep ? KEEP : 0);
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (c < 0 || connect(c, (const struct sockaddr *)a, sizeof *a)) {
            if (!*failed) fprintf(stderr, "connection %d: %s\n", i, strerror(errno));
            (*failed)++;
            if (c >= 0) close(c);
            continue;
        }
        char x;
        if (!echo8(c, tag) || (!keep && read(c, &x, 1) != 0)) {
            if (!*failed) fprintf(stderr, "connection %d: no echo or no close\n", i);
            (*failed)++;
        } else {
            (*ok)++;
        }
        if (keep)
            kept[(*nkept)++] = c;
        else
            close(c);
    }
}

/* N short connections to a server in `once` mode, from PROCS processes at once (each takes
 * every PROCS-th connection): one process alone would measure its own round trips more than
 * the server. The processes keep their sampled connections until the SYNC is released. */
static void churn(int port, int n, int procs) {
    raise_nofile(400000);
    struct sockaddr_in a = to_port(port);
    long *count = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(count != MAP_FAILED);
    int done[2], release[2];
    CHECK(pipe(done) == 0 && pipe(release) == 0);
    double t0 = now_ms();
    for (int p = 0; p < procs; p++) {
        pid_t w = fork();
        CHECK(w >= 0);
        if (w == 0) {
            close(done[0]);
            close(release[1]);
            static int kept[256];
            int nkept = 0;
            long ok = 0, failed = 0;
            churn_part(&a, p, procs, n, &ok, &failed, kept, &nkept);
            __atomic_add_fetch(&count[0], ok, __ATOMIC_SEQ_CST);
            __atomic_add_fetch(&count[1], failed, __ATOMIC_SEQ_CST);
            CHECK(write(done[1], "d", 1) == 1);
            close(done[1]);
            char x;
            while (read(release[0], &x, 1) > 0) {
            }
            for (int i = 0; i < nkept; i++) close(kept[i]);
            _exit(0);
        }
    }
    close(done[1]);
    close(release[0]);
    int finished = 0;
    char x;
    while (finished < procs && read(done[0], &x, 1) == 1) finished++;
    double t = now_ms() - t0;
    CHECK(finished == procs); /* a churning process died: its share is missing */
    printf("short connections: %ld echoed, %ld failed\n", count[0], count[1]);
    printf("figure: %d short connections from %d processes in %.0f ms (%.0f/s)\n", n, procs, t,
           n * 1000.0 / t);
    sync_point();
    close(release[1]);
    int clean = 0;
    for (int p = 0; p < procs; p++) {
        int st;
        clean += wait(&st) > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0;
    }
    CHECK(clean == procs);
}

/* ------------------------------------------------------------------------------------------ */

#define CONNS 8
#define PER_CONN 8 /* 4 senders + 4 receivers */
#define RECORDS 2000
#define REC 64

struct shared {
    int fd;
    pthread_mutex_t send_lock, recv_lock;
    long received, corrupt, out_of_order;
    uint32_t next_seq[PER_CONN / 2]; /* per sender: next sequence number expected */
};

static struct shared sh[CONNS];

struct worker {
    struct shared *s;
    int id; /* 0..3 sender id, or -1 for a receiver */
};

static uint32_t sum(const unsigned char *r) {
    uint32_t x = 2166136261u;
    for (int i = 0; i < REC - 4; i++) x = (x ^ r[i]) * 16777619u;
    return x;
}

static void *sender(void *p) {
    struct worker *w = p;
    unsigned char r[REC];
    for (uint32_t seq = 0; seq < RECORDS; seq++) {
        r[0] = (unsigned char)w->id;
        memcpy(r + 1, &seq, 4);
        for (int i = 5; i < REC - 4; i++) r[i] = (unsigned char)(seq * 31 + (uint32_t)i * 7 + (uint32_t)w->id);
        uint32_t x = sum(r);
        memcpy(r + REC - 4, &x, 4);
        /* One record per send, whole: a lock per connection keeps records from interleaving
         * when a send is cut short by full buffers (as on TCP); receivers run meanwhile. */
        pthread_mutex_lock(&w->s->send_lock);
        write_all(w->s->fd, r, REC);
        pthread_mutex_unlock(&w->s->send_lock);
    }
    return NULL;
}

static void *receiver(void *p) {
    struct worker *w = p;
    struct shared *s = w->s;
    unsigned char r[REC];
    for (;;) {
        pthread_mutex_lock(&s->recv_lock);
        if (s->received == (long)RECORDS * (PER_CONN / 2)) {
            pthread_mutex_unlock(&s->recv_lock);
            return NULL;
        }
        ssize_t n = recv(s->fd, r, REC, MSG_WAITALL);
        if (n != REC) {
            pthread_mutex_unlock(&s->recv_lock);
            fprintf(stderr, "recv: %s\n", res(n));
            exit(2);
        }
        uint32_t seq, x;
        memcpy(&seq, r + 1, 4);
        memcpy(&x, r + REC - 4, 4);
        int id = r[0];
        s->received++;
        if (id >= PER_CONN / 2 || x != sum(r))
            s->corrupt++;
        else if (seq != s->next_seq[id]++)
            s->out_of_order++;
        pthread_mutex_unlock(&s->recv_lock);
    }
}

static void threads(int port) {
    struct sockaddr_in a = to_port(port);
    for (int i = 0; i < CONNS; i++) {
        sh[i].fd = connect_to(&a);
        pthread_mutex_init(&sh[i].send_lock, NULL);
        pthread_mutex_init(&sh[i].recv_lock, NULL);
    }
    static struct worker w[CONNS * PER_CONN];
    pthread_t t[CONNS * PER_CONN];
    double t0 = now_ms();
    for (int i = 0; i < CONNS; i++)
        for (int k = 0; k < PER_CONN; k++) {
            struct worker *x = &w[i * PER_CONN + k];
            x->s = &sh[i];
            x->id = k < PER_CONN / 2 ? k : -1;
            t[i * PER_CONN + k] = spawn(x->id >= 0 ? sender : receiver, x);
        }
    for (int i = 0; i < CONNS * PER_CONN; i++) pthread_join(t[i], NULL);
    double el = now_ms() - t0;
    long got = 0, bad = 0, order = 0;
    for (int i = 0; i < CONNS; i++) {
        got += sh[i].received;
        bad += sh[i].corrupt;
        order += sh[i].out_of_order;
    }
    printf("threads: %d on %d shared connections\n", CONNS * PER_CONN, CONNS);
    printf("records: sent %ld received %ld corrupt %ld out of order %ld\n",
           (long)CONNS * (PER_CONN / 2) * RECORDS, got, bad, order);
    printf("figure: %ld records of %d bytes echoed in %.0f ms\n", got, REC, el);
    sync_point();
    for (int i = 0; i < CONNS; i++) close(sh[i].fd);
}

int main(int argc, char **argv) {
    (void)pollstr; /* sem.h helpers this program does not need */
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGPIPE, SIG_IGN);
    const char *mode = argc >= 5 ? argv[4] : "echo";
    if (argc >= 3 && !strcmp(argv[1], "server") && (!strcmp(mode, "echo") || !strcmp(mode, "once")))
        server(atoi(argv[2]), argc >= 4 ? atoi(argv[3]) : 1, !strcmp(mode, "once"),
               argc >= 6 ? atoi(argv[5]) : 0);
    else if (argc >= 5 && !strcmp(argv[1], "conns")) conns(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    else if (argc >= 5 && !strcmp(argv[1], "churn"))
        churn(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    else if (argc >= 3 && !strcmp(argv[1], "threads")) threads(atoi(argv[2]));
    else if (argc >= 4 && !strcmp(argv[1], "latency")) {
        struct sockaddr_in a = to_port(atoi(argv[2]));
        pingpong(&a, atoi(argv[3]), argc >= 5 ? argv[4] : "");
    } else {
        fprintf(stderr, "usage: load server PORT [WORKERS [echo|once [MAX]]] | conns PORT N ROUNDS | churn PORT N PROCS | threads PORT | latency PORT ITER [LABEL]\n");
        return 2;
    }
    return 0;
}
