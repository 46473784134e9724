/* A TCP socket living at fd 1500 (above FD_SETSIZE): poll, ppoll, epoll and plain I/O
 * on it must work as on any fd. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define HIGH 1500

static void die(const char *what) { perror(what); exit(1); }

int main(void) {
    struct rlimit rl = { .rlim_cur = 4096, .rlim_max = 4096 };
    struct rlimit cur;
    getrlimit(RLIMIT_NOFILE, &cur);
    if (cur.rlim_max > rl.rlim_max) rl.rlim_max = cur.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl)) die("setrlimit");
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 8)) die("listen");
    if (getsockname(l, (struct sockaddr *)&a, &alen)) die("getsockname");
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&a, sizeof a)) die("connect");
    int s = accept(l, NULL, NULL);
    if (s < 0) die("accept");
    if (dup2(c, HIGH) != HIGH) die("dup2");
    close(c);
    printf("F_GETFD: %d\n", fcntl(HIGH, F_GETFD));
    struct pollfd p = { .fd = HIGH, .events = POLLIN | POLLOUT };
    int n = poll(&p, 1, 0);
    printf("poll idle: %d%s%s\n", n, p.revents & POLLIN ? " IN" : "", p.revents & POLLOUT ? " OUT" : "");
    if (write(s, "data", 4) != 4) die("write");
    p.events = POLLIN;
    p.revents = 0;
    n = poll(&p, 1, 2000);
    printf("poll after write: %d%s\n", n, p.revents & POLLIN ? " IN" : "");
    struct timespec ts = { .tv_sec = 2 };
    sigset_t none;
    sigemptyset(&none);
    p.revents = 0;
    n = ppoll(&p, 1, &ts, &none);
    printf("ppoll: %d%s\n", n, p.revents & POLLIN ? " IN" : "");
    int ep = epoll_create1(0);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = HIGH }, out;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, HIGH, &ev)) die("epoll_ctl");
    n = epoll_wait(ep, &out, 1, 2000);
    printf("epoll: %d fd=%d%s\n", n, out.data.fd, out.events & EPOLLIN ? " IN" : "");
    char buf[16];
    ssize_t got = read(HIGH, buf, sizeof buf);
    printf("read: %.*s\n", (int)got, buf);
    if (send(HIGH, "back", 4, 0) != 4) die("send");
    got = recv(s, buf, sizeof buf, 0);
    printf("peer got: %.*s\n", (int)got, buf);
    close(HIGH);
    got = recv(s, buf, sizeof buf, 0);
    printf("peer after close: %zd\n", got);
    int fl = fcntl(HIGH, F_GETFD);
    printf("fcntl after close: %d %s\n", fl, fl < 0 && errno == EBADF ? "EBADF" : "?");
    return 0;
}
