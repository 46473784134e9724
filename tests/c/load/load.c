/* Load (issue 8, item 3), driven by tests/load.rs:
 *
 *   load server PORT             epoll echo server on PORT
 *   load conns PORT N ROUNDS     N concurrent connections to PORT, ROUNDS echo round trips on
 *                                every one while all are open; SYNC; ROUNDS more; closes all
 *   load churn PORT N            N short connections one after another (connect, 8-byte echo,
 *                                close); every 1000th is kept open until the SYNC at the end
 *   load threads PORT            64 threads on 8 shared connections (4 senders, 4 receivers per
 *                                connection), records checked for integrity; SYNC
 *   load latency PORT ITER       ITER ping-pongs of 64 bytes on one connection; prints p50/p99
 *
 * Every mode prints what it checked (counts that must be exact) and, on lines starting with
 * "figure:", the timings the harness reports without asserting them. */
#include "../semantics/sem.h"
#include <sys/epoll.h>

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

static void server(int port) {
    raise_nofile(400000);
    int l = listener_on(AF_INET, (uint16_t)port);
    CHECK(listen(l, 4096) == 0);
    int fl = fcntl(l, F_GETFL);
    CHECK(fcntl(l, F_SETFL, fl | O_NONBLOCK) == 0);
    int ep = epoll_create1(0);
    CHECK(ep >= 0);
    struct epoll_event e = {.events = EPOLLIN, .data.fd = l};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, l, &e) == 0);
    static struct epoll_event ev[512];
    static char b[1 << 16];
    for (;;) {
        int n = epoll_wait(ep, ev, 512, -1);
        if (n < 0 && errno == EINTR) continue;
        CHECK(n >= 0);
        for (int i = 0; i < n; i++) {
            int fd = ev[i].data.fd;
            if (fd == l) {
                for (;;) {
                    int s = accept4(l, NULL, NULL, 0);
                    if (s < 0) {
                        if (errno == EMFILE || errno == ENFILE) {
                            fprintf(stderr, "accept: %s\n", strerror(errno));
                            exit(3); /* the harness sizes the test to fit: say so, loudly */
                        }
                        break;
                    }
                    struct epoll_event se = {.events = EPOLLIN, .data.fd = s};
                    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, s, &se) == 0);
                }
                continue;
            }
            ssize_t r = read(fd, b, sizeof b);
            if (r <= 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
                continue;
            }
            /* Echo: small messages fit the send buffer; block for the rest. */
            write_all(fd, b, (size_t)r);
        }
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

static void churn(int port, int n) {
    raise_nofile(400000);
    struct sockaddr_in a = to_port(port);
    int kept[256], nkept = 0;
    long ok = 0, failed = 0;
    double t0 = now_ms();
    for (int i = 0; i < n; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof a)) {
            if (!failed) fprintf(stderr, "connection %d: %s\n", i, strerror(errno));
            failed++;
            if (c >= 0) close(c);
            continue;
        }
        if (echo8(c, (uint64_t)i))
            ok++;
        else
            failed++;
        if (i % 1000 == 999 && nkept < 256)
            kept[nkept++] = c;
        else
            close(c);
    }
    double t = now_ms() - t0;
    printf("short connections: %ld echoed, %ld failed\n", ok, failed);
    printf("figure: %d short connections in %.0f ms (%.0f/s)\n", n, t, n * 1000.0 / t);
    sync_point();
    for (int i = 0; i < nkept; i++) close(kept[i]);
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
    if (argc >= 3 && !strcmp(argv[1], "server")) server(atoi(argv[2]));
    if (argc >= 5 && !strcmp(argv[1], "conns")) conns(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    else if (argc >= 4 && !strcmp(argv[1], "churn")) churn(atoi(argv[2]), atoi(argv[3]));
    else if (argc >= 3 && !strcmp(argv[1], "threads")) threads(atoi(argv[2]));
    else if (argc >= 4 && !strcmp(argv[1], "latency")) {
        struct sockaddr_in a = to_port(atoi(argv[2]));
        pingpong(&a, atoi(argv[3]), argc >= 5 ? argv[4] : "");
    } else {
        fprintf(stderr, "usage: load server PORT | conns PORT N ROUNDS | churn PORT N | threads PORT | latency PORT ITER [LABEL]\n");
        return 2;
    }
    return 0;
}
