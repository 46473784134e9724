/* Non-blocking connect driven by epoll: EINPROGRESS, EPOLLOUT, SO_ERROR; data both
 * ways through edge-triggered epoll; half-close seen as EPOLLRDHUP; a refused connect
 * reported through SO_ERROR. Prints only what is deterministic. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

static unsigned wait_one(int ep, int fd, int ms) {
    struct epoll_event ev[4];
    int n = epoll_wait(ep, ev, 4, ms);
    if (n < 0) die("epoll_wait");
    for (int i = 0; i < n; i++)
        if (ev[i].data.fd == fd) return ev[i].events;
    return 0;
}

static void names(const char *what, unsigned e) {
    printf("%s:%s%s%s%s%s\n", what, e & EPOLLIN ? " IN" : "", e & EPOLLOUT ? " OUT" : "",
           e & EPOLLRDHUP ? " RDHUP" : "", e & EPOLLERR ? " ERR" : "", e & EPOLLHUP ? " HUP" : "");
}

int main(void) {
    int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = { .sin_family = AF_INET };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 8)) die("listen");
    if (getsockname(l, (struct sockaddr *)&a, &alen)) die("getsockname");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");

    int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int r = connect(c, (struct sockaddr *)&a, sizeof a);
    printf("connect: %s\n", r == 0 ? "done" : errno == EINPROGRESS ? "in progress" : strerror(errno));
    struct epoll_event ev = { .events = EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.fd = c };
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev)) die("epoll_ctl c");
    ev.events = EPOLLIN;
    ev.data.fd = l;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev)) die("epoll_ctl l");
    names("client", wait_one(ep, c, 2000));
    int err = -1;
    socklen_t elen = sizeof err;
    getsockopt(c, SOL_SOCKET, SO_ERROR, &err, &elen);
    printf("SO_ERROR: %d\n", err);
    names("listener", wait_one(ep, l, 2000));
    int s = accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (s < 0) die("accept4");
    char buf[64];
    ssize_t early = recv(s, buf, sizeof buf, 0);
    printf("recv before data: %zd %s\n", early, early < 0 && errno == EAGAIN ? "EAGAIN" : "?");
    ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET;
    ev.data.fd = s;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev)) die("epoll_ctl s");
    if (send(c, "ping", 4, 0) != 4) die("send");
    names("server", wait_one(ep, s, 2000));
    ssize_t n = recv(s, buf, sizeof buf, 0);
    printf("server got: %.*s\n", (int)n, buf);
    if (send(s, "pong", 4, 0) != 4) die("send");
    shutdown(s, SHUT_WR);
    /* Data and half-close may be reported by one wake-up or by several: collect until
     * the half-close is seen. */
    ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET;
    ev.data.fd = c;
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c, &ev)) die("epoll_ctl mod c");
    unsigned seen = 0;
    for (int i = 0; i < 20 && !(seen & EPOLLRDHUP); i++) seen |= wait_one(ep, c, 100);
    names("client", seen & (EPOLLIN | EPOLLRDHUP));
    n = recv(c, buf, sizeof buf, 0);
    printf("client got: %.*s\n", (int)n, buf);
    printf("client then: %zd\n", recv(c, buf, sizeof buf, 0));
    close(c);
    close(s);

    /* Refused: a port bound but not listening. */
    int b = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in z = { .sin_family = AF_INET };
    z.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t zlen = sizeof z;
    if (bind(b, (struct sockaddr *)&z, sizeof z) || getsockname(b, (struct sockaddr *)&z, &zlen)) die("bind");
    int d = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    r = connect(d, (struct sockaddr *)&z, sizeof z);
    printf("connect to closed port: %s\n",
           r == 0 ? "done" : errno == EINPROGRESS ? "in progress" : errno == ECONNREFUSED ? "refused" : strerror(errno));
    if (r < 0 && errno == EINPROGRESS) {
        ev.events = EPOLLOUT;
        ev.data.fd = d;
        if (epoll_ctl(ep, EPOLL_CTL_ADD, d, &ev)) die("epoll_ctl d");
        names("refused", wait_one(ep, d, 2000));
        getsockopt(d, SOL_SOCKET, SO_ERROR, &err, &elen);
        printf("SO_ERROR: %s\n", err == ECONNREFUSED ? "ECONNREFUSED" : strerror(err));
    }
    return 0;
}
