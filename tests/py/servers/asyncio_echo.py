"""An asyncio streams echo server and client, for tests/servers.rs.

usage: asyncio_echo.py serve PORT
       asyncio_echo.py client PORT CONNECTIONS BYTES

The client opens CONNECTIONS concurrent connections; each writes BYTES bytes of a pattern of
its own while reading the echo, checks the echo, and prints one line (no ports, no timings).
With every connection still open it prints SYNC and waits for a line on stdin (the harness
reads `sdp stat` there), then closes them and prints the total.
"""
import asyncio
import hashlib
import sys


def pattern(index, size):
    block = bytes((index * 31 + i * 7) % 251 for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


async def serve(port):
    async def echo(reader, writer):
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(echo, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


async def one(port, index, size):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = pattern(index, size)

    async def send():
        for off in range(0, size, 65536):
            writer.write(data[off : off + 65536])
            await writer.drain()

    sender = asyncio.create_task(send())
    got = await reader.readexactly(size)
    await sender
    digest = hashlib.sha256(got).hexdigest()[:16]
    return reader, writer, f"conn {index}: {len(got)} bytes sha256 {digest} echo {got == data}"


async def client(port, conns, size):
    done = await asyncio.gather(*(one(port, i, size) for i in range(conns)))
    for _, _, line in done:
        print(line)
    print("SYNC", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    total = 0
    for reader, writer, _ in done:
        writer.write_eof()
        total += len(await reader.read())  # the server's end of stream: nothing more
        writer.close()
        await writer.wait_closed()
    print(f"closed {len(done)} connections, {total} bytes after end of stream")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(serve(int(sys.argv[2])))
    else:
        asyncio.run(client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
