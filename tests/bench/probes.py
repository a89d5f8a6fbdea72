"""Latency per transaction and memory per idle connection (issue 7).

latency(): a small SMTP client keeps one connection open to each contender
and runs N sequential transactions, interleaved across contenders
(A B C, A B C, ...), timing MAIL FROM sent -> 250 after the end of DATA.

idle_connections(): opens N connections from this one process with
non-blocking sockets and epoll (RLIMIT_NOFILE raised to the hard limit),
waits until every one has read its 220 greeting, then measures the
contender's process tree (RSS and PSS), and closes them.
"""

import os
import select
import socket
import statistics
import time

from peers import tree_memory_kib


def _percentile(values, q):
    v = sorted(values)
    if not v:
        return float("nan")
    k = min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))
    return v[k]


class _Client:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.reply()
        self.cmd(b"EHLO latency.bench.test\r\n")

    def reply(self):
        """Reads one complete (possibly multi-line) reply; returns its code."""
        while True:
            while b"\r\n" in self.buf:
                line, self.buf = self.buf.split(b"\r\n", 1)
                if len(line) >= 4 and line[3:4] == b" ":
                    return int(line[:3])
                if len(line) < 4:
                    return int(line[:3] or b"0")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk

    def cmd(self, line):
        self.sock.sendall(line)
        return self.reply()

    def transaction(self, body):
        t0 = time.perf_counter()
        for line, want in ((b"MAIL FROM:<sender@example.test>\r\n", 250),
                           (b"RCPT TO:<rcpt@example.test>\r\n", 250),
                           (b"DATA\r\n", 354)):
            code = self.cmd(line)
            if code != want:
                raise RuntimeError(f"{line.strip()!r} answered {code}")
        code = self.cmd(body + b".\r\n")
        if code != 250:
            raise RuntimeError(f"end of DATA answered {code}")
        return time.perf_counter() - t0

    def close(self):
        try:
            self.cmd(b"QUIT\r\n")
        except OSError:
            pass
        self.sock.close()


def latency(contenders, count, length=1024):
    """contenders: [(name, port)]. Returns {name: [seconds per transaction]}."""
    line = b"x" * 76 + b"\r\n"
    body = b"Subject: latency probe\r\n\r\n" + line * max(1, length // len(line))
    clients = {name: _Client(port) for name, port in contenders}
    times = {name: [] for name, _ in contenders}
    try:
        for i in range(count):
            for name, _ in contenders:
                times[name].append(clients[name].transaction(body))
    finally:
        for c in clients.values():
            c.close()
    return times


def latency_table(times, count):
    out = [f"Latency per transaction (MAIL FROM sent -> 250 after DATA, 1 KB, {count} sequential transactions "
           "per contender on one connection each, interleaved; added = contender minus direct):", "",
           "| contender | p50 ms | p99 ms | added p50 ms | added p99 ms |", "|---|---|---|---|---|"]
    d50 = _percentile(times["direct"], 0.5) * 1e3
    d99 = _percentile(times["direct"], 0.99) * 1e3
    for name, t in times.items():
        p50, p99 = _percentile(t, 0.5) * 1e3, _percentile(t, 0.99) * 1e3
        out.append(f"| {name} | {p50:.3f} | {p99:.3f} | {p50 - d50:+.3f} | {p99 - d99:+.3f} |")
    return "\n".join(out)


def idle_connections(pid, port, count, settle=1.0, timeout=45.0):
    """Holds `count` idle connections to port, each past its greeting; returns
    a dict with rss/pss per connection (KiB) of pid's process tree, how many
    got a greeting and an error text if some did not."""
    before_rss, before_pss = tree_memory_kib(pid)
    ep = select.epoll()
    socks = {}
    greeted = set()
    bufs = {}
    failed = 0
    error = None
    deadline = time.time() + timeout
    try:
        pending = 0
        opened = 0
        while (opened < count or pending) and time.time() < deadline:
            # Open in batches so the listen backlog is never the limit.
            while opened < count and pending < 500:
                s = socket.socket()
                s.setblocking(False)
                try:
                    s.connect_ex(("127.0.0.1", port))
                except OSError as e:
                    error = f"connect: {e}"
                    s.close()
                    opened = count
                    break
                socks[s.fileno()] = s
                bufs[s.fileno()] = b""
                ep.register(s.fileno(), select.EPOLLIN)
                opened += 1
                pending += 1
            for fd, ev in ep.poll(1.0):
                s = socks[fd]
                try:
                    data = s.recv(512)
                except OSError:
                    data = b""
                if not data:
                    failed += 1
                    pending -= 1
                    ep.unregister(fd)
                    continue
                bufs[fd] += data
                if b"\r\n" in bufs[fd]:
                    ep.unregister(fd)
                    pending -= 1
                    if bufs[fd].startswith(b"220"):
                        greeted.add(fd)
                    else:
                        failed += 1
                        error = error or f"greeting {bufs[fd][:60]!r}"
        if len(greeted) < count:
            error = error or f"{count - len(greeted)} connections got no greeting within {timeout:.0f} s"
        time.sleep(settle)
        after_rss, after_pss = tree_memory_kib(pid)
    finally:
        ep.close()
        for s in socks.values():
            s.close()
    n = max(len(greeted), 1)
    return {
        "greeted": len(greeted),
        "failed": failed,
        "rss": (after_rss - before_rss) / n,
        "pss": (after_pss - before_pss) / n if after_pss is not None and before_pss is not None else None,
        "error": error,
    }
