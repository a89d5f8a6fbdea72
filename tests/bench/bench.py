#!/usr/bin/env python3
"""Load benchmark: RelayGuard against a direct connection and HAProxy, same run.

Postfix's smtp-source drives the same load through each contender in front
of the same smtp-sink, interleaved (A B C, A B C, ...), so that the noise
of a small shared machine hits every contender alike. The headline is the
ratio of medians to the direct baseline, never an absolute time.

Truth is what reached the sink (smtp-sink -c), not what smtp-source counted:
smtp-source counts DATA commands answered 354, not finished messages.

Usage: python3 tests/bench/bench.py [--rounds N] [--messages N] [--quick]
"""

import argparse
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Sink:
    """smtp-sink with a running delivery counter read from its stdout."""

    def __init__(self):
        self.port = free_port()
        args = ["smtp-sink", "-c", f"127.0.0.1:{self.port}", "1024"]
        if os.geteuid() == 0:
            args[1:1] = ["-u", "nobody"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.count = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(self.port)

    def _read(self):
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(4096) if hasattr(self.proc.stdout, "read1") else self.proc.stdout.read(64)
            if not chunk:
                return
            buf = (buf + chunk)[-256:]
            nums = re.findall(rb"(\d+)", buf)
            if nums:
                with self.lock:
                    self.count = max(self.count, int(nums[-1]))

    def delivered(self):
        time.sleep(0.2)
        with self.lock:
            return self.count

    def stop(self):
        self.proc.kill()


def start_relayguard(sink_port, tmp):
    port = free_port()
    cfg = os.path.join(tmp, "relayguard.yaml")
    with open(cfg, "w") as f:
        f.write(f"""hostname: bench.relayguard.test
listeners:
  - name: smtp
    address: 127.0.0.1:{port}
backend:
  servers: ["127.0.0.1:{sink_port}"]
  pool:
    max_idle: 64
limits:
  max_connections: 20000
  max_connections_per_ip: 20000
policy:
  local_domains: [example.test]
""")
    binary = os.path.join(ROOT, "target", "release", "relayguard")
    env = dict(os.environ, RELAYGUARD_LOG="warn")
    proc = subprocess.Popen([binary, "run", "--config", cfg], stderr=subprocess.DEVNULL, env=env)
    wait_port(port)
    return proc, port


def start_haproxy(sink_port, tmp):
    if not shutil.which("haproxy"):
        return None, None
    port = free_port()
    cfg = os.path.join(tmp, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend smtp
    bind 127.0.0.1:{port}
    default_backend sink
backend sink
    server sink 127.0.0.1:{sink_port}
""")
    proc = subprocess.Popen(["haproxy", "-f", cfg, "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def smtp_source(port, sessions, messages, length, per_connection):
    args = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(length),
            "-f", "sender@example.test", "-t", "rcpt@example.test", "-M", "bench.client.test"]
    if per_connection:
        args.append("-d")
    args.append(f"127.0.0.1:{port}")
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return time.perf_counter() - start


def idle_memory(pid, port, count):
    """RSS growth per idle connection that has read its greeting."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 1000)), hard))
    before = rss_kib(pid)
    conns = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port))
            conns.append(s)
        for s in conns:
            s.settimeout(10)
            s.recv(512)
        time.sleep(0.5)
        after = rss_kib(pid)
    finally:
        for s in conns:
            s.close()
    return (after - before) / count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="1 round, few messages (smoke test)")
    ap.add_argument("--idle-only", action="store_true", help="only measure memory per idle connection")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.messages, args.idle = 1, 200, 200

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    subprocess.run(["cargo", "build", "--release", "-p", "relayguard"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="relayguard-bench-")
    sink = Sink()
    rg, rg_port = start_relayguard(sink.port, tmp)
    ha, ha_port = start_haproxy(sink.port, tmp)
    contenders = [("direct", None, sink.port), ("relayguard", rg, rg_port)]
    if ha:
        contenders.insert(1, ("haproxy", ha, ha_port))

    results = {}
    try:
        for per_connection in () if args.idle_only else (False, True):
            mode = "many msgs/conn" if per_connection else "1 msg/conn"
            rates = {name: [] for name, _, _ in contenders}
            cpu = {name: [] for name, _, _ in contenders}
            for _ in range(args.rounds):
                for name, proc, port in contenders:
                    before = sink.delivered()
                    cpu0 = cpu_seconds(proc.pid) if proc else 0.0
                    elapsed = smtp_source(port, args.sessions, args.messages, args.length, per_connection)
                    delivered = sink.delivered() - before
                    if delivered != args.messages:
                        print(f"WARNING: {name}: {delivered} of {args.messages} messages reached the sink", file=sys.stderr)
                    rates[name].append(delivered / elapsed)
                    if proc:
                        cpu[name].append((cpu_seconds(proc.pid) - cpu0) / max(delivered, 1))
            results[mode] = (rates, cpu)
        idle = {}
        for name, proc, port in contenders:
            if proc:
                try:
                    idle[name] = idle_memory(proc.pid, port, args.idle)
                except OSError as e:
                    print(f"WARNING: {name}: idle connections failed: {e}", file=sys.stderr)
    finally:
        for _, proc, _ in contenders:
            if proc:
                proc.kill()
        sink.stop()

    print(f"\n{args.length}-byte messages, {args.sessions} parallel clients, {args.messages} messages per run, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| load | contender | msgs/s (median) | ratio to direct | ratio to HAProxy | CPU µs/msg |")
    print("|---|---|---|---|---|---|")
    for mode, (rates, cpu) in results.items():
        direct = statistics.median(rates["direct"])
        haproxy = statistics.median(rates["haproxy"]) if "haproxy" in rates else None
        for name in rates:
            m = statistics.median(rates[name])
            ratio_ha = f"{m / haproxy:.2f}" if haproxy else "-"
            c = f"{statistics.median(cpu[name]) * 1e6:.0f}" if cpu[name] else "-"
            print(f"| {mode} | {name} | {m:.0f} | {m / direct:.2f} | {ratio_ha} | {c} |")
    print(f"\nRSS growth per idle connection after the greeting ({args.idle} connections):\n")
    print("| contender | KiB per connection |")
    print("|---|---|")
    for name, kib in idle.items():
        print(f"| {name} | {kib:.2f} |")


if __name__ == "__main__":
    main()
