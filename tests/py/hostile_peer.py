"""A hostile SDP peer against a preloaded echo server, with an honest client beside it.

Roles (argv[1]):
  server PORT          threaded echo server; prints READY, then serves until stdin closes,
                       then prints its open fd count and exits 0. A connection that fails
                       prints "after ERRNO: recv ..., send ..." (one more of each after it).
  honest PORT N        N echo round trips of varied sizes, each checked; prints "honest ok N".
  attacker PORT SEED   connects, echoes once (so the connection is SDP), then scribbles random
                       bytes over the connection's shared memory (the libsdp memfd it holds)
                       while sending, for two seconds; prints "attacker done" whatever the
                       connection did (reset, end of stream, or nothing).
"""
import errno, mmap, os, random, socket, sys, threading, time

role, port = sys.argv[1], int(sys.argv[2])

def errname(e):
    return errno.errorcode.get(e.errno, str(e.errno))

def echo_conn(c):
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            c.sendall(b)
    except OSError as e:
        # LINUX: a connection reports its reset once; after it the socket reads end of stream
        # and writes EPIPE. The test compares what follows the first error with that.
        after = []
        try:
            after.append("recv %r" % c.recv(16))
        except OSError as e2:
            after.append("recv " + errname(e2))
        try:
            c.send(b"x")
            after.append("send ok")
        except OSError as e2:
            after.append("send " + errname(e2))
        err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        after.append("SO_ERROR %s" % (errno.errorcode.get(err, str(err)) if err else 0))
        print("after %s: %s" % (errname(e), ", ".join(after)), flush=True)
    finally:
        c.close()

if role == "server":
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", port))
    l.listen(16)
    def accept_loop():
        while True:
            try:
                c, _ = l.accept()
            except OSError:
                return
            threading.Thread(target=echo_conn, args=(c,), daemon=True).start()
    threading.Thread(target=accept_loop, daemon=True).start()
    print("READY", flush=True)
    sys.stdin.read()
    print("fds", len(os.listdir("/proc/self/fd")), flush=True)
    os._exit(0)

elif role == "honest":
    n = int(sys.argv[3])
    c = socket.create_connection(("127.0.0.1", port))
    rnd = random.Random(7)
    for i in range(n):
        msg = bytes(rnd.getrandbits(8) for _ in range(rnd.choice([1, 100, 5000, 70000])))
        c.sendall(msg)
        got = b""
        while len(got) < len(msg):
            b = c.recv(len(msg) - len(got))
            assert b, "honest: end of stream at round %d" % i
            got += b
        assert got == msg, "honest: corrupted echo at round %d" % i
        time.sleep(0.005)
    print("honest ok", n, flush=True)
    c.close()

elif role == "attacker":
    rnd = random.Random(int(sys.argv[3]))
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"hello")
    assert c.recv(5) == b"hello"
    maps = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "libsdp-shm" in os.readlink("/proc/self/fd/" + fd):
                size = os.fstat(int(fd)).st_size
                maps.append(mmap.mmap(int(fd), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
        except OSError:
            pass
    print("attacker maps", len(maps), flush=True)
    c.settimeout(0.05)
    end = time.time() + 2.0
    while time.time() < end:
        for m in maps:
            for _ in range(64):
                # Past the 64-byte global header (whose owner generation would only make our
                # own library stop): the side blocks' indices and flags, the key tables, and
                # the message slots the server parses.
                off = rnd.randrange(64, min(len(m), 1 << 16)) if rnd.random() < 0.8 else rnd.randrange(64, len(m) - 8)
                m[off:off + 8] = rnd.getrandbits(64).to_bytes(8, "little")
        try:
            c.send(os.urandom(rnd.choice([1, 64, 4096])))
            c.recv(65536)
        except (OSError, socket.timeout):
            pass
    print("attacker done", flush=True)
    os._exit(0)
