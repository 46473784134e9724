"""Lifetime cases a review found broken once, for tests/lifetime.rs. Each prints facts that
must hold over SDP, and `shm: True` when `sdp stat` showed this process's connection on shm
while it ran (the SDP run must not have silently fallen back to TCP).

usage: lifetime.py SDP_BINARY CASE
"""
import hashlib, json, os, select, socket, subprocess, sys, threading, time

SDP, CASE = sys.argv[1], sys.argv[2]


def on_shm():
    out = subprocess.run([SDP, "stat", "--json"], capture_output=True, text=True).stdout
    rows = [json.loads(l) for l in out.splitlines() if l.strip()]
    return any(r.get("pid") == os.getpid() and r.get("transport") == "shm" for r in rows)


def read_to_eof(sock, chunk):
    """Everything `sock` delivers until end of stream, `chunk` bytes a receive at most."""
    got = b""
    while True:
        d = sock.recv(chunk)
        if not d:
            return got
        got += d


def pair():
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(8)
    c = socket.create_connection(l.getsockname())
    s, _ = l.accept()
    return l, c, s


if CASE == "idle-fork-child":
    # A forked child that never touches the connection must not take it over.
    l, c, s = pair()
    c.sendall(b"\xab" * 10)
    pid = os.fork()
    if pid == 0:
        time.sleep(1)
        os._exit(0)
    n = 4 << 20
    got = bytearray()

    def reader():
        while len(got) < n + 10:
            d = s.recv(1 << 16)
            if not d:
                break
            got.extend(d)

    t = threading.Thread(target=reader)
    t.start()
    c.sendall(b"\xab" * n)
    t.join(20)
    print("shm:", on_shm())
    os.waitpid(pid, 0)
    print("received all:", len(got) == n + 10, "pattern intact:", got.count(0xAB) == len(got))

elif CASE == "exec-unrelated":
    # A fork+exec'd program that ignores an inherited SDP socket leaves it to the parent.
    l, c, s = pair()
    os.set_inheritable(c.fileno(), True)
    pid = os.fork()
    if pid == 0:
        os.execvp("sleep", ["sleep", "1"])
    ok = 0
    for i in range(200):
        c.sendall(b"ping%03d" % i)
        d = s.recv(64)
        s.sendall(d)
        if c.recv(64) == b"ping%03d" % i:
            ok += 1
    print("shm:", on_shm())
    os.waitpid(pid, 0)
    print("ping-pongs ok:", ok)

elif CASE == "fork-while-busy":
    # Forks while another thread drives a connection: no child may hang in _exit.
    l, c, s = pair()
    stop = False

    def busy():
        while not stop:
            c.sendall(b"x" * 100)
            n = 0
            while n < 100:
                n += len(s.recv(100 - n))

    t = threading.Thread(target=busy)
    t.start()
    hung = 0
    for _ in range(300):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        deadline = time.time() + 5
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() > deadline:
                hung += 1
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                break
            time.sleep(0.0005)
    print("shm:", on_shm())
    stop = True
    t.join()
    print("hung children:", hung)

elif CASE == "no-fd-leak":
    # Connections opened and closed leave no descriptor of the library behind.
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(64)
    c = socket.create_connection(l.getsockname())
    s, _ = l.accept()
    c.sendall(b"warm")
    s.recv(4)
    print("shm:", on_shm())
    c.close()
    s.close()
    # Rings kept for a next connection with the same process go after a second unused
    # (ib_verbs::shm::reuse): the counts are taken without them.
    time.sleep(1.5)
    base = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        c = socket.create_connection(l.getsockname())
        s, _ = l.accept()
        c.sendall(b"y" * 200000)
        n = 0
        while n < 200000:
            n += len(s.recv(1 << 16))
        c.close()
        s.close()
    time.sleep(1.5)
    print("fds grew by:", len(os.listdir("/proc/self/fd")) - base)

elif CASE == "idle-after-half-close":
    # A connection whose peer half-closed (shutdown SHUT_WR) and stays costs no CPU while idle,
    # here and in the peer: the half-close must not leave a watch that is ready for ever.
    def cpu_ticks(pid):
        total = 0
        for t in os.listdir("/proc/%d/task" % pid):
            f = open("/proc/%d/task/%s/stat" % (pid, t)).read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        return total

    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(8)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        c = socket.create_connection(l.getsockname())
        c.sendall(b"request")
        c.shutdown(socket.SHUT_WR)
        print("peer got:", c.recv(100), flush=True)
        os.read(r, 1)
        os._exit(0)
    s, _ = l.accept()
    got = read_to_eof(s, 100)
    print("server got:", got, "then end of stream")
    s.sendall(b"reply")
    time.sleep(0.3)
    print("shm:", on_shm())
    a, pa = cpu_ticks(os.getpid()), cpu_ticks(pid)
    time.sleep(1)
    b, pb = cpu_ticks(os.getpid()), cpu_ticks(pid)
    # Clock ticks of 10 ms: a spinning thread takes about 100 in this second.
    print("idle cpu: server", "low" if b - a <= 10 else "%d ticks" % (b - a),
          "peer", "low" if pb - pa <= 10 else "%d ticks" % (pb - pa))
    os.write(w, b"x")
    os.waitpid(pid, 0)

elif CASE == "reuseport":
    # Two unrelated processes listen on one port with SO_REUSEPORT; the kernel spreads the
    # connections between them, but a client's intent reaches one beacon only. A connection
    # the other process accepts must go on over TCP at once (reason peer-declined), not wait
    # for the pending timeout, and the others are SDP.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    ready_r, ready_w = os.pipe()
    servers = []
    for tag in (b"A", b"B"):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            l = socket.socket()
            l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            l.bind(("127.0.0.1", port))
            l.listen(64)
            os.write(ready_w, b"r")
            while True:
                s, _ = l.accept()
                s.sendall(tag + s.recv(100))
                servers.append(s)  # held open: the client reads sdp stat first
        servers.append(pid)
    os.close(ready_w)
    assert os.read(ready_r, 1) and os.read(ready_r, 1)
    conns, served = [], {}
    for i in range(24):
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"req%d" % i)
        r = c.recv(100)
        assert r[1:] == b"req%d" % i, r
        served[r[:1]] = served.get(r[:1], 0) + 1
        conns.append(c)
    print("served by both:", len(served) == 2)
    rows = [json.loads(l) for l in subprocess.run([SDP, "stat", "--json"], capture_output=True,
            text=True).stdout.splitlines() if l.strip()]
    mine = [r for r in rows if r.get("pid") == os.getpid() and r.get("role") == "client"]
    ways = sorted(set((r["transport"], r["fallback_reason"]) for r in mine))
    print("client connections:", len(mine), "ways:", ways)
    print("shm:", on_shm())
    for pid in servers:
        os.kill(pid, 9)
        os.waitpid(pid, 0)

elif CASE == "pass-fd":
    # A server process accepts, sends the connection's fd to a worker process over a unix
    # socket (SCM_RIGHTS) and closes its copy; the worker serves the client. Over TCP both
    # processes held one socket; the worker must be served, and the close must not end it.
    import array
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(8)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker = os.fork()
    if worker == 0:
        l.close()
        a.close()
        msg, anc, flags, _ = b.recvmsg(1, socket.CMSG_SPACE(4))
        s = socket.socket(fileno=array.array("i", anc[0][2][:4])[0])
        for _ in range(2):
            s.sendall(b"worker: " + s.recv(100))
        s.close()
        os._exit(0)
    master = os.fork()
    if master == 0:
        b.close()
        s, _ = l.accept()
        s.recv(5, socket.MSG_PEEK)  # the request is there, unread, when the fd leaves
        a.sendmsg([b"f"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]).tobytes())])
        s.close()
        os._exit(0)
    a.close()
    b.close()
    c = socket.create_connection(l.getsockname())
    c.settimeout(10)
    c.sendall(b"first")
    print("client got:", c.recv(100))
    os.waitpid(master, 0)
    c.sendall(b"second")
    print("client got:", c.recv(100))
    print("shm:", on_shm())
    print("then:", c.recv(100))
    os.waitpid(worker, 0)

elif CASE == "subprocess-stdio":
    # Python's subprocess: the child gets the socket as stdin and stdout (dup2), closes every
    # other descriptor (close_range) and execs; then os.posix_spawnp with dup2 actions, and a
    # child given the socket with pass_fds. Each on a connection of its own (after a child
    # used a connection, the parent cannot: README, "where SDP differs"). Each child's output
    # reaches the client, and the client then reads end of stream.
    conns = [pair() for _ in range(3)]
    for _, c, _ in conns:
        c.settimeout(10)
    (_, c, s) = conns[0]
    c.sendall(b"one\n")
    p = subprocess.Popen(["head", "-c", "4"], stdin=s, stdout=s)
    print("subprocess rc:", p.wait(10), "client got:", c.recv(100))
    (_, c, s) = conns[1]
    c.sendall(b"two\n")
    pid = os.posix_spawnp("head", ["head", "-c", "4"], os.environ,
                          file_actions=[(os.POSIX_SPAWN_DUP2, s.fileno(), 0),
                                        (os.POSIX_SPAWN_DUP2, s.fileno(), 1)])
    print("posix_spawn status:", os.waitpid(pid, 0)[1], "client got:", c.recv(100))
    (_, c, s) = conns[2]
    code = "import os, socket; socket.socket(fileno=int(os.environ['FD'])).sendall(b'three')"
    r = subprocess.run([sys.executable, "-c", code], pass_fds=[s.fileno()],
                       env=dict(os.environ, FD=str(s.fileno())))
    print("pass_fds rc:", r.returncode, "client got:", c.recv(100))
    print("shm:", on_shm())
    for _, c, s in conns:
        s.close()
    print("then:", [c.recv(100) for _, c, _ in conns])

elif CASE == "parent-after-child-exec":
    # A child's exec'd program used the connection; the parent's copy of its state is stale
    # (README, "where SDP differs": one process at a time). Its first send must fail, not
    # report success for bytes that never arrive.
    l, c, s = pair()
    c.settimeout(10)
    c.sendall(b"q\n")
    pid = os.fork()
    if pid == 0:
        os.dup2(s.fileno(), 0)
        os.dup2(s.fileno(), 1)
        os.execvp("head", ["head", "-c", "2"])
    os.waitpid(pid, 0)
    print("client got:", c.recv(100))
    print("shm:", on_shm())
    try:
        n = s.send(b"late")
        c.settimeout(1)
        try:
            got = c.recv(100)
        except OSError:
            got = None
        print("parent send:", n, "client got:", got, "(lost)" if got != b"late" else "")
    except OSError as e:
        print("parent send:", os.strerror(e.errno))

elif CASE == "second-program-on-a-relayed-connection":
    # The parent keeps the accepted socket and runs one program per request on it (pass_fds).
    # A connection is relayed once (README, "where SDP differs"): the second program cannot
    # use it, and must learn so (end of stream, EPIPE) instead of writing an answer that is
    # taken and lost.
    l, c, s = pair()
    child = ("import socket, sys\n"
             "s = socket.socket(fileno=int(sys.argv[1])); s.settimeout(5)\n"
             "got = s.recv(100)\n"
             "try:\n"
             "    s.sendall(b'answer'); sent = 'sent'\n"
             "except OSError as e:\n"
             "    sent = type(e).__name__\n"
             "print(got, sent)\n")
    for i in range(2):
        c.sendall(b"request%d" % i)
        r = subprocess.run([sys.executable, "-c", child, str(s.fileno())],
                           pass_fds=[s.fileno()], capture_output=True, text=True, timeout=20)
        c.settimeout(2)
        try:
            got = c.recv(100)
        except OSError as e:
            got = type(e).__name__
        if i == 0:
            print("shm:", on_shm())
        print("program %d: %s | client got %s" % (i, r.stdout.strip(), got))

elif CASE == "inherited-listener":
    # A server program exec'd on a listening socket it inherited (a supervisor, socket
    # activation). While the process that made the listener (and published its beacon) keeps
    # it open, an SDP client's connection must not stall waiting for an exchange nobody makes:
    # it goes on over TCP at once. Once that process closed it, the exec'd program serves
    # the next connections over SDP.
    code = ("import socket, sys\n"
            "l = socket.socket(fileno=int(sys.argv[1]))\n"
            "while True:\n"
            "    s, _ = l.accept()\n"
            "    s.sendall(s.recv(2))\n"
            "    while s.recv(100): pass\n"
            "    s.close()\n")
    for keep in (True, False):
        l = socket.socket()
        l.bind(("127.0.0.1", 0))
        l.listen(8)
        port = l.getsockname()[1]
        p = subprocess.Popen([sys.executable, "-c", code, str(l.fileno())], pass_fds=[l.fileno()])
        if not keep:
            l.close()
        slowest, shm = 0.0, []
        for i in range(3):
            t = time.time()
            c = socket.create_connection(("127.0.0.1", port))
            c.settimeout(10)
            c.sendall(b"hi")
            c.recv(2)
            slowest = max(slowest, time.time() - t)
            shm.append(on_shm())
            c.close()
        p.kill()
        p.wait()
        print("the listener's maker keeps it:", keep, "slowest under 0.5 s:", slowest < 0.5,
              "over shm after the first:", shm[1:])
    print("shm:", shm[-1])

elif CASE == "fallback-while-writing":
    # A client writes while its connection is still pending (the SDP exchange not done, the
    # bytes taken into the pending buffer), and the server turns out to speak TCP: a program
    # exec'd on the listener without the preload, which greets first. Every byte must reach
    # the server once and in order, and a shutdown made while pending must reach it as end
    # of stream. Until 2026-11-27: a writer blocked on the full pending buffer slept for ever
    # when it then looked at a full TCP socket (its wait had registered on the old app end),
    # or, woken, sent the pending bytes a second time; a non-blocking client lost what its
    # send buffer could not take at once; a shutdown made while pending was forgotten.
    code = ("import hashlib, socket, sys, time\n"
            "l = socket.socket(fileno=int(sys.argv[1]))\n"
            "slow = sys.argv[2] == 'slow'\n"
            "s, _ = l.accept()\n"
            "time.sleep(0.3)\n"
            "s.sendall(b'hi\\n')\n"
            "time.sleep(0.3)\n"
            "h, n = hashlib.sha256(), 0\n"
            "while True:\n"
            "    b = s.recv(4096)\n"
            "    if not b: break\n"
            "    h.update(b); n += len(b)\n"
            "    if slow and n < (1 << 20): time.sleep(0.0005)\n"
            "try:\n"
            "    s.sendall(b'%d %s\\n' % (n, h.hexdigest().encode()))\n"
            "except OSError:\n"
            "    pass\n")
    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    # A hung client fails the case here, not at the runner's limit.
    threading.Timer(40, lambda: (print("a client hung", flush=True), os._exit(3))).start()

    def plain_server(slow):
        l = socket.socket()
        # Small buffers and a slow reader keep the TCP socket full when the writer looks.
        l.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        l.bind(("127.0.0.1", 0))
        l.listen(8)
        p = subprocess.Popen([sys.executable, "-c", code, str(l.fileno()), slow],
                             pass_fds=[l.fileno()], env=plain)
        return l, p

    def client(l, sndbuf):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        c.connect(l.getsockname())
        return c

    def verdict(what, c, payload, p, greeting=b""):
        answer = (greeting + read_to_eof(c, 100)).decode().split()
        want = ["hi", str(len(payload)), hashlib.sha256(payload).hexdigest()]
        print(what + ": the server got every byte once:", answer == want)
        p.wait()

    # A blocking client whose large send filled the pending buffer and waits.
    l, p = plain_server("slow")
    c = client(l, 4096)
    payload = os.urandom(2 << 20)
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    print("tcp:", not on_shm())
    verdict("blocked writer", c, payload, p)
    # A non-blocking client whose 256 KiB went into the pending buffer at once; it waits for
    # the greeting (the connection is on TCP then) before its shutdown.
    l, p = plain_server("fast")
    c = client(l, 16384)
    c.setblocking(False)
    payload = os.urandom(256 << 10)
    off = 0
    while off < len(payload):
        try:
            off += c.send(payload[off:])
        except BlockingIOError:
            select.select([], [c], [], 10)
    select.select([c], [], [], 10)
    c.setblocking(True)
    greeting = c.recv(3)
    c.shutdown(socket.SHUT_WR)
    verdict("non-blocking writer", c, payload, p, greeting)
    # A client that sends its request and shuts down while still pending.
    l, p = plain_server("fast")
    c = client(l, 16384)
    payload = os.urandom(1000)
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    verdict("shutdown while pending", c, payload, p)
    # A client whose connection went back to TCP replaces its fd with another file (Java's
    # way to close a socket under other threads): the server reads end of stream. Until
    # 2026-11-27 the library kept its own reference to the socket, and no FIN went.
    l, p = plain_server("fast")
    c = client(l, 16384)
    c.sendall(b"x")
    greeting = c.recv(3)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, c.fileno())
    try:
        p.wait(timeout=10)
        ended = True
    except subprocess.TimeoutExpired:
        p.kill()
        ended = False
    os.close(null)
    print("fd replaced after the fallback: the server read end of stream:",
          greeting == b"hi\n" and ended)
    os._exit(0)

elif CASE == "relayed-names":
    # A program given a connection as its stdin (fork + exec, posix_spawn) talks to it through
    # a relay, and a process that passed a connection over a unix socket keeps one: each
    # still names the TCP connection (family, own address, peer address, a TCP option).
    import array
    child = ("import socket, os\n"
             "s = socket.socket(fileno=0)\n"
             "info = (int(s.family), s.getsockname(), s.getpeername(),\n"
             "        s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) in (0, 1))\n"
             "s.detach()\n"
             "os.write(1, repr(info).encode() + b'\\n')\n")
    conns = [pair() for _ in range(3)]
    want = [repr((int(socket.AF_INET), s.getsockname(), s.getpeername(), True))
            for _, _, s in conns]
    for _, c, _ in conns:
        c.settimeout(10)
    (_, c, s) = conns[0]
    # By name: the child's execve fails in each PATH directory before the one holding it (the
    # records must survive the failed attempts), and python3 may be a wrapper script that execs
    # again (they must pass through).
    path = "/nonexistent/a:/nonexistent/b:" + os.environ.get("PATH", "/usr/bin")
    subprocess.run(["python3", "-c", child], stdin=s, stdout=s, env=dict(os.environ, PATH=path))
    print("exec'd program sees the TCP names:", c.recv(300).decode().strip() == want[0])
    (_, c, s) = conns[1]
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", child], os.environ,
                         file_actions=[(os.POSIX_SPAWN_DUP2, s.fileno(), 0),
                                       (os.POSIX_SPAWN_DUP2, s.fileno(), 1)])
    os.waitpid(pid, 0)
    print("spawned program sees the TCP names:", c.recv(300).decode().strip() == want[1])
    (_, c, s) = conns[2]
    a, b = socket.socketpair()
    a.sendmsg([b"f"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]).tobytes())])
    mine = repr((int(s.family), s.getsockname(), s.getpeername(),
                 s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) in (0, 1)))
    print("the sender's socket still names the TCP connection:", mine == want[2])
    print("shm:", on_shm())

elif CASE == "cgi":
    # A CGI-style server: the child's program writes the response on the socket; the parent
    # waits, then shuts its copy down and closes it, per request (Python's http.server does).
    # The client gets every byte and end of stream, and the parent's library logs nothing:
    # the parent's shutdown of a copy its child's program took over is not an error.
    import tempfile
    log = tempfile.TemporaryFile()
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(8)
    got = []
    for i in range(3):
        c = socket.create_connection(l.getsockname())
        c.settimeout(10)
        s, _ = l.accept()
        c.sendall(b"GET /%d\n" % i)
        s.recv(100)
        pid = os.fork()
        if pid == 0:
            os.dup2(s.fileno(), 1)
            os.execvp("sh", ["sh", "-c", "echo response; head -c 100000 /dev/zero"])
        os.waitpid(pid, 0)
        s.shutdown(socket.SHUT_WR)
        s.close()
        data = read_to_eof(c, 65536)
        got.append(data == b"response\n" + b"\0" * 100000)
        if i == 2:
            print("shm:", on_shm())
        c.close()
    os.dup2(saved, 2)
    log.seek(0)
    logged = log.read().decode(errors="replace")
    print("every response whole:", all(got), "library log lines:", logged.count("libsdp["))

elif CASE == "passed-then-closed-leaves-nothing":
    # Connections passed over a unix socket (each goes to a relay, and a kept duplicate of its
    # TCP socket answers its names here) and then closed by both ends leave no descriptor
    # behind in this process, however many there were.
    import array
    a, b = socket.socketpair()
    def count():
        return len(os.listdir("/proc/self/fd"))
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(64)
    before = count()
    shm_seen = False
    for i in range(30):
        c = socket.create_connection(l.getsockname())
        s, _ = l.accept()
        c.sendall(b"x")
        s.recv(1)
        a.sendmsg([b"f"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]).tobytes())])
        msg, anc, flags, _ = b.recvmsg(1, socket.CMSG_SPACE(4))
        r = socket.socket(fileno=array.array("i", anc[0][2][:4])[0])
        r.sendall(b"y")
        c.settimeout(10)
        ok = c.recv(1) == b"y"
        if i == 0:
            shm_seen = on_shm()
        for x in (r, s, c):
            x.close()
    deadline = time.time() + 5
    while count() > before + 2 and time.time() < deadline:
        time.sleep(0.05)
    print("shm:", shm_seen)
    print("descriptors back to where they were:", count() <= before + 2, "(", count() - before, ")")

elif CASE == "answer-then-exit-unread":
    # The exec'd program answers and exits with the peer's bytes unread (`head -c 10` echoing
    # the first ten): the peer's writes fail, and the answer still reaches it, as over TCP.
    import errno
    l, c, s = pair()
    p = subprocess.Popen(["head", "-c", "10"], stdin=s, stdout=s)
    s.close()
    c.settimeout(10)
    res = "no error"
    try:
        for i in range(400):
            c.send(b"z" * 65536)
            if i == 0:
                print("shm:", on_shm())
            time.sleep(0.002)
    except OSError as e:
        res = errno.errorcode[e.errno]
    p.wait(10)
    got = read_to_eof(c, 100)
    print("writer failed:", res in ("ECONNRESET", "EPIPE"), "reader got:", got)

elif CASE == "fork-child-waits-in-epoll":
    # A forked child that only waits in an epoll set watching the connection must not take
    # the connection over while the parent reads from it: its epoll_wait's spin looks at the
    # set's rings, and must not progress a connection another process serves (consuming the
    # parent's messages and claiming it: the parent then gets EIO).
    import errno
    l, c, s = pair()
    pid = os.fork()
    if pid == 0:
        # A set of its own, made after the fork: the library polls the rings of its sets.
        ep = select.epoll()
        ep.register(s.fileno(), select.EPOLLIN)
        end = time.monotonic() + 2
        while time.monotonic() < end:
            ep.poll(0.005)
        os._exit(0)
    n = 4 << 20
    got = bytearray()
    err = "none"

    def reader():
        global err
        try:
            while len(got) < n:
                d = s.recv(1 << 16)
                if not d:
                    break
                got.extend(d)
                time.sleep(0.0005)
        except OSError as e:
            err = errno.errorcode[e.errno]

    t = threading.Thread(target=reader)
    t.start()
    c.settimeout(20)
    try:
        c.sendall(b"\xcd" * n)
    except OSError:
        pass  # the reader failed; it says so below
    t.join(20)
    print("shm:", on_shm())
    os.waitpid(pid, 0)
    print("reader error:", err)
    print("received all:", len(got) == n, "pattern intact:", got.count(0xCD) == len(got))

elif CASE == "parent-uses-then-child":
    # After a fork the parent goes on using the connection, then the child sends on it.
    # libsdp cannot share a connection between two processes (docs/ARCHITECTURE.md,
    # "Lifetime"): the child must get EIO, and the parent and the peer must go on as before.
    # The child's send used to succeed on the positions it copied at the fork: its bytes went
    # into slots the peer had read already, and were lost without an error.
    import errno
    l, c, s = pair()
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.read(r, 1)
        try:
            c.sendall(b"child")
            res = "sent"
        except OSError as e:
            res = errno.errorcode[e.errno]
        os.write(w2, res.encode())
        os._exit(0)
    c.sendall(b"parent")
    print("parent's bytes:", s.recv(64))
    os.write(w, b"x")
    print("child's send:", os.read(r2, 64).decode())
    os.waitpid(pid, 0)
    c.sendall(b"again")
    print("parent's bytes after:", s.recv(64))
    print("shm:", on_shm())

elif CASE == "oneshot-across-fallback":
    # A client waits for its pending connection in an epoll set with EPOLLONESHOT (a server
    # that hands each event to one worker thread), takes the event and does not re-arm yet;
    # then the server turns out to speak TCP (a program without the preload, which greets
    # first) and the connection goes back to TCP, its registration moved to the kernel
    # socket. It must stay disarmed: the move used to re-arm it, and a second worker would
    # have got the fd the first one still served.
    code = ("import socket, sys, time\n"
            "l = socket.socket(fileno=int(sys.argv[1]))\n"
            "s, _ = l.accept()\n"
            "time.sleep(0.3)\n"
            "s.sendall(b'hi\\n')\n"
            "while s.recv(4096): pass\n")
    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(8)
    p = subprocess.Popen([sys.executable, "-c", code, str(l.fileno())],
                         pass_fds=[l.fileno()], env=plain)
    c = socket.socket()
    c.connect(l.getsockname())
    ep = select.epoll()
    ep.register(c.fileno(), select.EPOLLOUT | select.EPOLLONESHOT)
    print("first event:", ep.poll(5) == [(c.fileno(), select.EPOLLOUT)])

    def on_tcp():
        out = subprocess.run([SDP, "stat", "--json"], capture_output=True, text=True).stdout
        rows = [json.loads(x) for x in out.splitlines() if x.strip()]
        return any(r.get("pid") == os.getpid() and r.get("transport") == "tcp" for r in rows)

    end = time.monotonic() + 10
    while not on_tcp() and time.monotonic() < end:
        time.sleep(0.05)
    print("back on tcp:", on_tcp())
    print("events while disarmed:", ep.poll(0.5))
    ep.modify(c.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
    print("re-armed:", ep.poll(5) == [(c.fileno(), select.EPOLLIN)], c.recv(16))
    c.close()
    p.wait()

elif CASE == "stdio-child":
    # A fork child writes through stdio on an inherited connection it never used otherwise
    # (a C server's `dup2(c, 1); printf(...); exit(0)`: the C library's own write, which no
    # preload sees) and exits. Its bytes must arrive, whether the parent closed its copy
    # right after the fork (the child's exit used to leave them in the bell end: only the
    # process serving a connection reads such bytes, and none served it) or kept it (the
    # parent's watch sends them, and the parent goes on using its copy).
    import ctypes
    libc = ctypes.CDLL(None)
    for mode in ("parent closed", "parent closed, printf", "parent kept"):
        l, c, s = pair()
        pid = os.fork()
        if pid == 0:
            time.sleep(0.1)
            if mode.endswith("printf"):
                # Buffered in the C library's stdout, which it flushes after the atexit
                # handlers, and so after the library's own end.
                os.dup2(c.fileno(), 1)
                libc.printf(b"hello from the child\n")
                libc.exit(0)
            libc.dprintf(c.fileno(), b"hello from the child\n")
            os._exit(0)
        if mode.startswith("parent closed"):
            c.close()
        s.settimeout(5)
        got = b""
        try:
            while not got.endswith(b"\n"):
                d = s.recv(100)
                if not d:
                    break
                got += d
        except OSError as e:
            got += repr(e).encode()
        if mode.startswith("parent closed"):
            print("shm:", on_shm())
            try:
                end = s.recv(100)
            except OSError as e:
                end = repr(e).encode()
            print(mode + ": got", got, "then end of stream:", end == b"")
        else:
            c.sendall(b"parent")
            print(mode + ": got", got, "then the parent's:", s.recv(100))
        os.waitpid(pid, 0)

elif CASE == "closed-under-a-blocked-receive":
    # One thread blocks in a receive on a connection; another closes the socket and opens a
    # pipe, which takes the same fd number; then the peer sends. The blocked receive must
    # not read the pipe (whatever the number names now is not its socket): it fails with
    # EBADF. It used to go on with the fd number, and took the pipe's bytes. (Over TCP it
    # would go on waiting on the closed socket and get the peer's bytes.)
    import errno
    l, c, s = pair()
    fd = s.detach()
    result = []

    def reader():
        try:
            result.append(os.read(fd, 100))
        except OSError as e:
            result.append(errno.errorcode[e.errno])

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    time.sleep(0.3)
    print("shm:", on_shm())
    os.close(fd)
    r, w = os.pipe()
    print("the pipe took the number:", r == fd)
    os.write(w, b"pipe bytes")
    c.sendall(b"peer bytes")
    t.join(10)
    print("blocked receive:", result, "still blocked:", t.is_alive())
    print("the pipe kept its bytes:", os.read(r, 100))
    # A send blocked on a peer that does not read, whose socket another thread closes (the
    # close lingers with the queued bytes): when the peer reads, the send ends with EBADF
    # rather than going on, and the peer gets what was written before the close, then end
    # of stream.
    l, c, s = pair()
    fd = c.detach()
    result, written = [], [0]

    def writer():
        try:
            while True:
                written[0] += os.write(fd, b"x" * (1 << 20))
        except OSError as e:
            result.append(errno.errorcode[e.errno])

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(0.5)
    os.close(fd)
    time.sleep(0.2)
    s.settimeout(10)
    got = len(read_to_eof(s, 1 << 16))
    t.join(5)
    print("blocked send:", result, "the peer got what was written:", got == written[0] > 0)
    s.close()

elif CASE == "stdio-stream-big":
    # Eight megabytes written through a stdio stream (`fdopen(fd, "w")`, `fwrite`, `fclose`)
    # to a reader that keeps up, then to one that falls behind, must arrive whole. The C
    # library writes a stream's buffer with its internal `write`, which no preload sees; those
    # bytes and the library's stuffing (made while the connection is out of credits) shared
    # the bell end, and hundreds of kilobytes were lost. The stream's fileno must still name
    # the socket.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fdopen.restype = ctypes.c_void_p
    libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
    libc.fileno.argtypes = [ctypes.c_void_p]
    libc.fwrite.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    for reader_kind in ("fast", "slow"):
        l, c, s = pair()
        n = 8 << 20
        data = os.urandom(n)
        fileno_ok = []

        def writer():
            fd = os.dup(c.fileno())
            f = libc.fdopen(fd, b"w")
            fileno_ok.append(libc.fileno(f) == fd)
            for off in range(0, n, 65536):
                libc.fwrite(data[off:off + 65536], 1, 65536, f)
            libc.fclose(f)
            c.close()

        t = threading.Thread(target=writer)
        t.start()
        h, got = hashlib.sha256(), 0
        s.settimeout(20)
        try:
            while True:
                d = s.recv(4096)
                if not d:
                    break
                h.update(d)
                got += len(d)
                if reader_kind == "slow" and got % (256 << 10) < 4096:
                    time.sleep(0.002)
                if got == 4096:
                    print("shm:", on_shm())
        except OSError as e:
            print("reader error:", e)
        t.join(10)
        print(reader_kind, "reader: got", got, "of", n, "intact:",
              h.digest() == hashlib.sha256(data).digest(), "fileno names the socket:", fileno_ok)
        s.close()

elif CASE == "short-connections-reuse-rings":
    # One short connection after another between two processes (a client and a forked
    # server): from the second on, each runs on the ring the one before it used, and every
    # reply is the one sent, whatever was left in the ring before.
    import struct

    def counter(pid, key):
        out = subprocess.run([SDP, "stat", "--json"], capture_output=True, text=True).stdout
        for l in out.splitlines():
            r = json.loads(l)
            if r.get("process") == pid:
                return r.get(key)
        return None

    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(64)
    n = 100
    threads, per_thread = 4, 25
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(hold_w)
        for i in range(n + threads * per_thread):
            s, _ = l.accept()
            want = struct.unpack("!I", s.recv(4, socket.MSG_WAITALL))[0]
            got = s.recv(want, socket.MSG_WAITALL) if want else b""
            s.sendall(got)
            if i % 3 == 0:
                s.sendall(b"unread" * 50)  # left in the ring: the client closes first
                time.sleep(0.001)
            s.close()
        os.read(hold_r, 1)  # stay alive for the parent's look at the statistics
        os._exit(0)
    os.close(hold_r)
    ok = 0
    shm = False
    for i in range(n):
        payload = bytes([i % 251]) * (1 + (i * 37) % 3000)
        c = socket.create_connection(l.getsockname())
        c.sendall(struct.pack("!I", len(payload)) + payload)
        got = c.recv(len(payload), socket.MSG_WAITALL)
        ok += got == payload
        if i == n - 1:
            shm = on_shm()
        c.close()
    # Then several threads at once, each with its own short connections: rings are kept and
    # taken concurrently, and every reply is still its own.
    whole = [0] * threads

    def client(t):
        for j in range(per_thread):
            payload = bytes([(t * 61 + j) % 251]) * (1 + (t * 997 + j * 131) % 5000)
            c = socket.create_connection(l.getsockname())
            c.sendall(struct.pack("!I", len(payload)) + payload)
            whole[t] += c.recv(len(payload), socket.MSG_WAITALL) == payload
            c.close()

    ts = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    time.sleep(0.2)
    print("shm:", shm)
    print("replies whole:", ok, "of", n)
    print("concurrent replies whole:", sum(whole), "of", threads * per_thread)
    print("client rings reused:", counter(os.getpid(), "rings_reused"))
    print("server rings reused:", counter(pid, "rings_reused"))
    os.write(hold_w, b"x")
    os.waitpid(pid, 0)
