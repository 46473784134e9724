/* Signals interrupting blocking socket calls, as the kernel defines it:
 * without SA_RESTART a blocking recv/read/accept fails with EINTR, with SA_RESTART it
 * is restarted and returns the data that comes later; SO_RCVTIMEO gives EAGAIN. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t hits;
static void on_alarm(int sig) { (void)sig; hits++; }

static void die(const char *what) { perror(what); exit(1); }

static void arm(int flags, int ms) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGALRM, &sa, NULL)) die("sigaction");
    struct itimerval it = { .it_value = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 } };
    hits = 0;
    if (setitimer(ITIMER_REAL, &it, NULL)) die("setitimer");
}

static const char *err_name(int e) {
    return e == EINTR ? "EINTR" : e == EAGAIN ? "EAGAIN" : strerror(e);
}

int main(void) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 8)) die("listen");
    if (getsockname(l, (struct sockaddr *)&a, &alen)) die("getsockname");

    /* accept() with nobody connecting, no SA_RESTART: EINTR. */
    arm(0, 100);
    int r = accept(l, NULL, NULL);
    printf("accept: %d %s hits=%d\n", r, r < 0 ? err_name(errno) : "ok", (int)hits);

    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&a, sizeof a)) die("connect");
    int s = accept(l, NULL, NULL);
    if (s < 0) die("accept");
    char buf[16];

    /* recv() with no data, no SA_RESTART: EINTR. */
    arm(0, 100);
    ssize_t n = recv(s, buf, sizeof buf, 0);
    printf("recv: %zd %s hits=%d\n", n, n < 0 ? err_name(errno) : "ok", (int)hits);

    /* read() likewise. */
    arm(0, 100);
    n = read(s, buf, sizeof buf);
    printf("read: %zd %s hits=%d\n", n, n < 0 ? err_name(errno) : "ok", (int)hits);

    /* SA_RESTART: the signal comes at 100 ms, the data at 400 ms; recv returns it. */
    pid_t p = fork();
    if (p < 0) die("fork");
    if (p == 0) {
        usleep(400000);
        if (write(c, "late", 4) != 4) _exit(1);
        _exit(0);
    }
    arm(SA_RESTART, 100);
    n = recv(s, buf, sizeof buf, 0);
    printf("recv SA_RESTART: %zd %.*s hits=%d\n", n, n > 0 ? (int)n : 0, buf, (int)hits);
    int st;
    waitpid(p, &st, 0);

    /* SO_RCVTIMEO: EAGAIN after the timeout, never restarted. */
    struct timeval tv = { .tv_sec = 0, .tv_usec = 150000 };
    if (setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv)) die("SO_RCVTIMEO");
    n = recv(s, buf, sizeof buf, 0);
    printf("recv SO_RCVTIMEO: %zd %s\n", n, n < 0 ? err_name(errno) : "ok");

    /* Peer closes: recv returns 0. */
    close(c);
    n = recv(s, buf, sizeof buf, 0);
    printf("recv after peer close: %zd\n", n);
    return 0;
}
