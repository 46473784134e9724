"""A server whose clients are exec'd children: bash's /dev/tcp and a python
subprocess. Prints what each side saw; nothing run-dependent."""
import socket
import subprocess
import sys

lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
lst.bind(("127.0.0.1", 0))
lst.listen(4)
port = lst.getsockname()[1]

bash = subprocess.Popen(
    ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}; echo hello from bash >&3; head -1 <&3"],
    stdout=subprocess.PIPE,
)
py = subprocess.Popen(
    [sys.executable, "-c",
     "import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
     "s.sendall(b'hello from python\\n'); print(s.makefile().readline().strip())",
     str(port)],
    stdout=subprocess.PIPE,
)
lines = []
for _ in range(2):
    conn, _ = lst.accept()
    with conn:
        line = conn.makefile("rb").readline()
        lines.append(line.decode().strip())
        conn.sendall(line.upper())
print("server heard:", sorted(lines))
print("bash got:", bash.communicate(timeout=20)[0].decode().strip(), "exit", bash.returncode)
print("python got:", py.communicate(timeout=20)[0].decode().strip(), "exit", py.returncode)
