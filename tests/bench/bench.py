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


AUTH_SECTION = """auth:
  ntlm:
    netbios_domain: DEMO
    netbios_computer: RELAYGUARD
    dns_domain: demo.test
    dns_computer: relayguard.demo.test
  users_file: users.yaml
  lockout:
    failure_delay: 0s
"""

USERS = """users:
  - user: alice
    domain: DEMO
    nt_hash: 406660820be8180b5d0f94dfd556cee1
    groups: [relay-senders]
    mail: [loadgen@example.test]
"""


def big_policy(rules):
    """A policy of `rules` rules; the last one is the one that matches."""
    out = ["policy:", "  local_domains: [example.test]", "  rules:"]
    for i in range(rules - 1):
        out += [f"    - name: rule-{i}", f"      users: [nobody{i}]",
                f"      recipient_domains: [dest{i}.test]"]
    out += ["    - name: relay-senders", "      groups: [relay-senders]",
            "      recipient_domains: ['*']"]
    return "\n".join(out) + "\n"


def start_relayguard(sink_port, tmp, auth=False, rules=0, name="relayguard"):
    port = free_port()
    cfg = os.path.join(tmp, f"{name}.yaml")
    policy = big_policy(rules) if rules else "policy:\n  local_domains: [example.test]\n"
    if auth:
        with open(os.path.join(tmp, "users.yaml"), "w") as f:
            f.write(USERS)
            # The users the big policy's rules name must exist: a rule
            # naming an unknown user is a configuration error.
            for i in range(rules):
                f.write(f"  - user: nobody{i}\n    domain: DEMO\n    nt_hash: {'0' * 32}\n")
    with open(cfg, "w") as f:
        f.write(f"""hostname: bench.relayguard.test
listeners:
  - name: smtp
    address: 127.0.0.1:{port}
    require_tls_for_auth: false
backend:
  servers: ["127.0.0.1:{sink_port}"]
  pool:
    max_idle: 64
limits:
  max_connections: 20000
  max_connections_per_ip: 20000
audit:
  sink: none
{AUTH_SECTION if auth else ""}{policy}""")
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


LOADGEN = os.path.join(ROOT, "target", "release", "relayguard-loadgen")


def loadgen(port, sessions, parallel, *flags):
    """Runs the NTLM load generator; returns its key=value results."""
    out = subprocess.run([LOADGEN, "handshakes", f"127.0.0.1:{port}", "alice", "DEMO", "alice-pass",
                          str(sessions), str(parallel), *flags],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    return {k: float(v) for k, v in (kv.split("=") for kv in out.split())}


def auth_benchmark(sink, tmp, rounds, sessions, parallel):
    """AUTH NTLM + relay policy against the same load without AUTH, and
    policy of 1,000 rules against a minimal one, interleaved; plus
    in-process verifications per core."""
    big, big_port = start_relayguard(sink.port, tmp, auth=True, rules=1000, name="rg-policy1000")
    plain, plain_port = start_relayguard(sink.port, tmp, auth=True, rules=0, name="rg-auth")
    results = {k: [] for k in ("no_auth", "ntlm", "ntlm_policy1000", "handshakes", "auth_p50", "auth_p99")}
    try:
        for _ in range(rounds):
            results["no_auth"].append(loadgen(plain_port, sessions, parallel, "--message", "--no-auth")["per_second"])
            r = loadgen(plain_port, sessions, parallel, "--message")
            results["ntlm"].append(r["per_second"])
            results["ntlm_policy1000"].append(loadgen(big_port, sessions, parallel, "--message")["per_second"])
            h = loadgen(plain_port, sessions, parallel)
            results["handshakes"].append(h["per_second"])
            results["auth_p50"].append(h["auth_p50_ms"])
            results["auth_p99"].append(h["auth_p99_ms"])
    finally:
        plain.kill()
        big.kill()
    verify = subprocess.run([LOADGEN, "verify", "3"], check=True, capture_output=True, text=True).stdout
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nAUTH NTLM through the gateway ({sessions} sessions per run, {parallel} parallel, one message each, "
          f"median of {rounds} interleaved rounds):\n")
    print("| load | sessions/s (median) | ratio to no AUTH |")
    print("|---|---|---|")
    print(f"| no AUTH, one message | {med['no_auth']:.0f} | 1.00 |")
    print(f"| AUTH NTLM + policy, one message | {med['ntlm']:.0f} | {med['ntlm'] / med['no_auth']:.2f} |")
    print(f"| AUTH NTLM + policy of 1,000 rules | {med['ntlm_policy1000']:.0f} | {med['ntlm_policy1000'] / med['no_auth']:.2f} |")
    print(f"\nFull NTLM handshakes per second (connect, EHLO, 3-step AUTH, QUIT): {med['handshakes']:.0f}; "
          f"AUTH exchange p50 {med['auth_p50']:.2f} ms, p99 {med['auth_p99']:.2f} ms")
    print(f"In-process NTLMv2 verifications (users file): {verify.strip()}")


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
    ap.add_argument("--auth-only", action="store_true", help="only the AUTH NTLM / policy benchmark")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.messages, args.idle = 1, 200, 200

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    subprocess.run(["cargo", "build", "--release", "-p", "relayguard", "-p", "relayguard-e2e",
                    "--bin", "relayguard", "--bin", "relayguard-loadgen"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="relayguard-bench-")
    sink = Sink()
    if args.auth_only:
        try:
            auth_benchmark(sink, tmp, args.rounds, max(args.messages // 3, 100), args.sessions)
        finally:
            sink.stop()
        return
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
