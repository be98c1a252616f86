#!/usr/bin/env python3
"""A TCP proxy for the PostgreSQL protocol that can make a LISTEN deaf.

It passes everything both ways, except that on the connections it has been
told to deafen it drops the server's NotificationResponse messages (type
'A'): the session stays healthy (queries answer, LISTEN is registered on the
server), it only never hears a notification. That is the failure the
end-to-end probe exists for (test_stats).

    notify_dropping_proxy.py UPSTREAM_HOST UPSTREAM_PORT

Prints "PORT <n>" once it accepts on 127.0.0.1:<n>. Signals:
    SIGUSR1  deafen the connections open now (later ones hear normally)
    SIGUSR2  every connection hears again
Each prints one line when done ("DEAF <connections>", "HEARING"). It ends
when its stdin closes (the test that started it is gone) or on SIGTERM.

Only the standard library. The client's SSLRequest or GSSENCRequest is
answered 'N' here (the test connects with sslmode=disable anyway), so the
server->client stream is typed messages from its first byte: a 1-byte type
and a 4-byte big-endian length that counts itself but not the type.
"""

import os
import signal
import socket
import struct
import sys
import threading

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104

links = set()
links_lock = threading.Lock()


class Link:
    def __init__(self, client):
        self.client = client
        self.server = None
        self.deaf = False
        self.dropped = 0

    def close(self):
        for s in (self.client, self.server):
            if s is None:
                continue
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with links_lock:
            links.discard(self)


def read_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_startup(client):
    """The client's first length-prefixed message, after any encryption
    request has been refused."""
    while True:
        head = read_exactly(client, 4)
        (length,) = struct.unpack("!I", head)
        body = read_exactly(client, length - 4)
        code = struct.unpack("!I", body[:4])[0] if len(body) >= 4 else 0
        if code in (SSL_REQUEST, GSSENC_REQUEST):
            client.sendall(b"N")
            continue
        return head + body


def client_to_server(link):
    try:
        while True:
            data = link.client.recv(65536)
            if not data:
                break
            link.server.sendall(data)
    except OSError:
        pass
    link.close()


def server_to_client(link):
    buf = b""
    try:
        while True:
            data = link.server.recv(65536)
            if not data:
                break
            buf += data
            out = []
            at = 0
            while len(buf) - at >= 5:
                (length,) = struct.unpack("!I", buf[at + 1:at + 5])
                end = at + 1 + length
                if end > len(buf):
                    break
                if buf[at] == ord("A") and link.deaf:
                    link.dropped += 1
                else:
                    out.append(buf[at:end])
                at = end
            buf = buf[at:]
            if out:
                link.client.sendall(b"".join(out))
    except OSError:
        pass
    link.close()


def serve(link, upstream):
    try:
        startup = read_startup(link.client)
        link.server = socket.create_connection(upstream)
        link.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.server.sendall(startup)
    except (OSError, EOFError):
        link.close()
        return
    threading.Thread(target=client_to_server, args=(link,), daemon=True).start()
    server_to_client(link)


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def deafen(signum, frame):
    with links_lock:
        now = list(links)
    for link in now:
        link.deaf = True
    say("DEAF %d" % len(now))


def hear(signum, frame):
    with links_lock:
        now = list(links)
    for link in now:
        link.deaf = False
    say("HEARING")


def exit_when_stdin_closes():
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os._exit(0)


def main():
    if len(sys.argv) != 3:
        sys.stderr.write("usage: notify_dropping_proxy.py UPSTREAM_HOST UPSTREAM_PORT\n")
        return 2
    upstream = (sys.argv[1], int(sys.argv[2]))
    signal.signal(signal.SIGUSR1, deafen)
    signal.signal(signal.SIGUSR2, hear)
    signal.signal(signal.SIGTERM, lambda s, f: os._exit(0))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    say("PORT %d" % listener.getsockname()[1])
    while True:
        client, _ = listener.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = Link(client)
        with links_lock:
            links.add(link)
        threading.Thread(target=serve, args=(link, upstream), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
