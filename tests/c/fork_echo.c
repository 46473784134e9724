/* Fork-per-connection echo server and a forking client, for the real-process tests.
 *   fork_echo server PORT N   accept N connections, one forked child each, which reads a
 *                             line and answers it upper-cased; prints "served N".
 *   fork_echo client PORT N   N forked children connect at once, send "hello <i>\n" and
 *                             print the answer (one write per line; order varies). */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

static int read_line(int fd, char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(fd, buf + n, 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        if (buf[n++] == '\n') break;
    }
    buf[n] = 0;
    return (int)n;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: fork_echo server|client PORT N\n"); return 2; }
    int port = atoi(argv[2]), n = atoi(argv[3]);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (!strcmp(argv[1], "server")) {
        int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        if (l < 0) die("socket");
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(l, (struct sockaddr *)&a, sizeof a)) die("bind");
        if (listen(l, 64)) die("listen");
        for (int i = 0; i < n; i++) {
            int c = accept(l, NULL, NULL);
            if (c < 0) die("accept");
            pid_t p = fork();
            if (p < 0) die("fork");
            if (p == 0) {
                char buf[256], out[300];
                close(l);
                read_line(c, buf, sizeof buf);
                for (char *q = buf; *q; q++) *q = toupper((unsigned char)*q);
                int len = snprintf(out, sizeof out, "child says %s", buf);
                if (write(c, out, len) != len) _exit(3);
                close(c);
                _exit(0);
            }
            close(c);
        }
        int ok = 0, st;
        while (wait(&st) > 0) ok += WIFEXITED(st) && WEXITSTATUS(st) == 0;
        printf("served %d, %d children ok\n", n, ok);
        return ok == n ? 0 : 1;
    }
    for (int i = 0; i < n; i++) {
        pid_t p = fork();
        if (p < 0) die("fork");
        if (p == 0) {
            char msg[64], buf[300];
            int s = socket(AF_INET, SOCK_STREAM, 0);
            if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) die("connect");
            int len = snprintf(msg, sizeof msg, "hello %d\n", i);
            if (write(s, msg, len) != len) die("write");
            int got = read_line(s, buf, sizeof buf);
            if (write(1, buf, got) != got) _exit(3);
            _exit(0);
        }
    }
    int ok = 0, st;
    while (wait(&st) > 0) ok += WIFEXITED(st) && WEXITSTATUS(st) == 0;
    return ok == n ? 0 : 1;
}
