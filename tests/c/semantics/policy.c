/* Policy and fallback: a server and a client that can run in different modes (plain or
 * preloaded, different policy files), and the explicit families of include/libsdp.h. */
#include "sem.h"
#include "../../../include/libsdp.h"

static int sync_wanted;

/* server PORT COUNT sync|nosync: accepts COUNT connections one after another; each: echo
 * one message, (sync), read to end of stream. */
static void server(int argc, char **argv) {
    CHECK(argc >= 5);
    int l = listener_on(AF_INET, (uint16_t)atoi(argv[2]));
    int count = atoi(argv[3]);
    sync_wanted = !strcmp(argv[4], "sync");
    printf("listening\n");
    for (int i = 0; i < count; i++) {
        int s = accept(l, NULL, NULL);
        CHECK(s >= 0);
        printf("accepted %d\n", i + 1);
        char b[64];
        ssize_t n = read(s, b, sizeof b);
        CHECK(n > 0);
        write_all(s, b, (size_t)n);
        printf("echoed: %.*s\n", (int)n, b);
        if (sync_wanted) sync_point();
        while ((n = read(s, b, sizeof b)) > 0) {
        }
        printf("end of stream: %s\n", res(n));
        close(s);
    }
}

static struct sockaddr_in to_port(const char *p) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(p))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

/* client PORT MESSAGE sync|nosync */
static void client(int argc, char **argv) {
    CHECK(argc >= 5);
    struct sockaddr_in a = to_port(argv[2]);
    int c = connect_to(&a);
    write_all(c, argv[3], strlen(argv[3]));
    char b[64];
    size_t len = strlen(argv[3]);
    read_all(c, b, len);
    printf("client got: %.*s\n", (int)len, b);
    if (!strcmp(argv[4], "sync")) sync_point();
    close(c);
}

/* probe PORT: connect, send nothing, see what the connection does within 2 s. */
static void probe(int argc, char **argv) {
    CHECK(argc >= 3);
    struct sockaddr_in a = to_port(argv[2]);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(c >= 0);
    printf("connect: %s\n", res(connect(c, (struct sockaddr *)&a, sizeof a)));
    int r = poll1(c, POLLIN | POLLRDHUP, 2000);
    printf("poll within 2 s: %s\n", pollstr(r));
    char b[16];
    printf("recv: %s\n", res(recv(c, b, sizeof b, MSG_DONTWAIT)));
    printf("send: %s\n", res(send(c, "x", 1, MSG_NOSIGNAL)));
}

/* family 27|28: a pair made with that family (AF_INET when the kernel alone rejects it). */
static void family(int argc, char **argv) {
    CHECK(argc >= 3);
    int fam = atoi(argv[2]);
    int l = socket(fam, SOCK_STREAM, 0);
    if (l < 0 && errno == EAFNOSUPPORT) {
        fam = AF_INET;
        l = socket(fam, SOCK_STREAM, 0);
    }
    CHECK(l >= 0);
    close(l);
    l = listener_on(fam, 0);
    int c = connect_family(fam, &listen_addr);
    int s = accept(l, NULL, NULL);
    CHECK(s >= 0);
    exchange(c, s);
    int v = -1;
    socklen_t len = sizeof v;
    CHECK(getsockopt(s, SOL_SOCKET, SO_DOMAIN, &v, &len) == 0);
    printf("SO_DOMAIN of accepted: %d\n", v);
    struct sockaddr_in n;
    len = sizeof n;
    CHECK(getsockname(c, (struct sockaddr *)&n, &len) == 0);
    printf("getsockname family: %d\n", n.sin_family);
    write_all(c, "family", 6);
    char b[8];
    read_all(s, b, 6);
    printf("server got: %.6s\n", b);
    sync_point();
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGPIPE, SIG_IGN);
    CHECK(argc >= 2);
    if (!strcmp(argv[1], "server")) server(argc, argv);
    else if (!strcmp(argv[1], "client")) client(argc, argv);
    else if (!strcmp(argv[1], "probe")) probe(argc, argv);
    else if (!strcmp(argv[1], "family")) family(argc, argv);
    else return 2;
    return 0;
}
