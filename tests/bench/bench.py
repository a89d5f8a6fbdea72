#!/usr/bin/env python3
"""Load benchmark: RelayGuard against a direct connection, HAProxy (TCP
mode), nginx's mail proxy and a Postfix relay, all in the same run.

Postfix's smtp-source drives the same load through each contender in front
of the same smtp-sink, interleaved (A B C D E, A B C D E, ...), so that the
noise of a small shared machine hits every contender alike. The headline is
the ratio of medians to the direct baseline, never an absolute time.

Truth is what reached the sink (smtp-sink -c), not what smtp-source counted:
smtp-source counts DATA commands answered 354, not finished messages. A run
ends when smtp-source has exited AND the sink holds every message (a
store-and-forward relay acknowledges before it delivers); a message
acknowledged but missing at the sink is reported.

Load matrix (issue 7): message sizes, parallel clients, messages per
connection (1, or 100 with smtp-source -d: -m = 100 x clients). Plus latency
per transaction (probes.latency) and memory per idle connection at 1,000 and
10,000 connections (probes.idle_connections). Peers: peers.py.

Usage: python3 tests/bench/bench.py [--rounds N] [--quick] [--matrix default|full]
       [--sizes 1k,100k,5m --clients 1,10,50 --per-conn 1,100]
       [--idle 1000,10000] [--latency N] [--contenders direct,haproxy,nginx,postfix,relayguard]
       python3 tests/bench/bench.py --auth-only   (AUTH NTLM + policy load)
"""

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402
import probes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# One implementation of the port helpers, shared with the peers' module.
free_port = peers.free_port
wait_port = peers.wait_port


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

    def wait_for(self, target, timeout):
        """Waits until the running count reaches target; returns the count."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if self.count >= target:
                    return self.count
            time.sleep(0.005)
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


def start_relayguard(sink_port, tmp, auth=False, rules=0, name="relayguard", binary=None,
                     stderr=subprocess.DEVNULL):
    """Writes a config and starts the gateway (the release build of this
    checkout unless `binary` names another); returns (process, port)."""
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
    binary = binary or os.path.join(ROOT, "target", "release", "relayguard")
    env = dict(os.environ, RELAYGUARD_LOG="warn")
    proc = subprocess.Popen([binary, "run", "--config", cfg], stderr=stderr, env=env)
    wait_port(port)
    return proc, port


def start_haproxy(sink_port, tmp, maxconn=12000):
    if not shutil.which("haproxy"):
        return None, None
    # HAProxy needs 2 fds per connection and cannot raise its limit above
    # the hard RLIMIT_NOFILE where CAP_SYS_RESOURCE is missing (containers).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        maxconn = min(maxconn, (hard - 100) // 2)
    port = free_port()
    cfg = os.path.join(tmp, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
    maxconn {maxconn}
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


def smtp_source(port, sessions, messages, length, per_connection, check=True):
    args = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(length),
            "-f", "sender@example.test", "-t", "rcpt@example.test", "-M", "bench.client.test"]
    if per_connection:
        args.append("-d")
    args.append(f"127.0.0.1:{port}")
    start = time.perf_counter()
    r = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)
    if check and r.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {r.stderr.decode(errors='replace')[-300:]}")
    return start, r


LOADGEN = os.path.join(ROOT, "target", "release", "examples", "relayguard-loadgen")


def loadgen(port, sessions, parallel, *flags):
    """Runs the NTLM load generator; returns its key=value results."""
    out = subprocess.run([LOADGEN, "handshakes", f"127.0.0.1:{port}", "alice", "DEMO", "alice-pass",
                          str(sessions), str(parallel), *flags],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    return {k: float(v) for k, v in (kv.split("=") for kv in out.split())}


# Messages per authenticated connection besides one: where the two extra
# round trips of the NTLM exchange stop mattering.
PER_CONN_SWEEP = (2, 5, 20)


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
            # Several messages per connection: AUTH once, then the same work.
            for n in PER_CONN_SWEEP:
                few = max(sessions // n, 10)
                results.setdefault(f"no_auth_{n}", []).append(
                    n * loadgen(plain_port, few, parallel, "--messages", str(n), "--no-auth")["per_second"])
                results.setdefault(f"ntlm_{n}", []).append(
                    n * loadgen(plain_port, few, parallel, "--messages", str(n))["per_second"])
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
    for n in PER_CONN_SWEEP:
        print(f"| no AUTH, {n} messages per connection (messages/s) | {med[f'no_auth_{n}']:.0f} | 1.00 |")
        print(f"| AUTH NTLM + policy, {n} messages per connection (messages/s) | {med[f'ntlm_{n}']:.0f} | "
              f"{med[f'ntlm_{n}'] / med[f'no_auth_{n}']:.2f} |")
    print(f"\nFull NTLM handshakes per second (connect, EHLO, 3-step AUTH, QUIT): {med['handshakes']:.0f}; "
          f"AUTH exchange p50 {med['auth_p50']:.2f} ms, p99 {med['auth_p99']:.2f} ms")
    print(f"In-process NTLMv2 verifications (users file): {verify.strip()}")


SIZES = {"1k": 1024, "100k": 100 * 1024, "5m": 5 * 1024 * 1024}
# Messages per run with one message per connection, by size (enough for a
# run of a second or more through the direct path, little enough that the
# slowest contender stays within a few seconds).
ONE_PER_CONN_MESSAGES = {"1k": 2000, "100k": 400, "5m": 20}
# Messages per run at least, by size, for the cells of many messages per
# connection (see run_matrix).
PER_CONN_TARGET = {"1k": 10000, "100k": 2000, "5m": 100}
# The default subset of the matrix: (size, clients, messages per connection).
DEFAULT_CELLS = [
    ("1k", 1, 1), ("1k", 10, 1), ("1k", 50, 1),
    ("1k", 10, 100), ("1k", 50, 100),
    ("100k", 10, 1), ("100k", 10, 100),
    ("5m", 10, 1),
]
ALL_CONTENDERS = ["direct", "haproxy", "nginx", "postfix", "relayguard"]


def cell_messages(size, clients, per_conn, scale):
    if per_conn > 1:
        return per_conn * clients  # smtp-source -d: -m is the total over all sessions
    return max(clients, int(ONE_PER_CONN_MESSAGES[size] * scale))


def cell_label(size, clients, per_conn):
    return f"{size}, {clients} clients, {per_conn} msg/conn"


def run_matrix(cells, contenders, sink, rounds, scale):
    """Interleaved rounds of every cell through every contender.
    Returns {cell: {name: {"rate": [...], "cpu": [...], "lost": int}}}."""
    results = {}
    for cell in cells:
        size, clients, per_conn = cell
        batch = cell_messages(size, clients, per_conn, scale)
        repeats = max(1, -(-PER_CONN_TARGET[size] // batch)) if per_conn > 1 else 1
        messages = batch * repeats
        res = {c.name: {"rate": [], "cpu": [], "lost": 0, "errors": []} for c in contenders}
        for _ in range(rounds):
            for c in contenders:
                before = sink.delivered()
                cpu0 = peers.tree_cpu_seconds(c.pid) if c.pid else 0.0
                # 100 messages per connection over a few clients is over in
                # a few milliseconds: such a cell repeats smtp-source within
                # the run (each time 100 per connection) until it has
                # PER_CONN_TARGET messages, so a run is not mostly start-up.
                start = None
                for _ in range(repeats):
                    began, r = smtp_source(c.port, clients, batch, SIZES[size], per_conn > 1, check=False)
                    start = start if start is not None else began
                    if r.returncode != 0:
                        break
                # Store-and-forward: the run ends when the sink has them all.
                got = sink.wait_for(before + messages, timeout=120 if r.returncode == 0 else 5)
                elapsed = time.perf_counter() - start
                delivered = got - before
                if r.returncode != 0:
                    res[c.name]["errors"].append(r.stderr.decode(errors="replace").strip()[-200:])
                if delivered != messages:
                    res[c.name]["lost"] += messages - delivered
                    print(f"WARNING: {cell_label(*cell)}: {c.name}: {delivered} of {messages} messages reached "
                          f"the sink (smtp-source exit {r.returncode})", file=sys.stderr)
                res[c.name]["rate"].append(delivered / elapsed)
                if c.pid:
                    res[c.name]["cpu"].append((peers.tree_cpu_seconds(c.pid) - cpu0) / max(delivered, 1))
            print(f"bench: {cell_label(*cell)}: round done", file=sys.stderr)
        results[cell] = (messages, res)
    return results


def matrix_table(results, rounds):
    out = ["| load | contender | msgs/s (median) | ratio to direct | ratio to HAProxy | CPU µs/msg | lost |",
           "|---|---|---|---|---|---|---|"]
    for cell, (messages, res) in results.items():
        med = {n: statistics.median(v["rate"]) for n, v in res.items()}
        direct = med.get("direct")
        haproxy = med.get("haproxy")
        for name, v in res.items():
            m = med[name]
            rd = f"{m / direct:.2f}" if direct else "-"
            rh = f"{m / haproxy:.2f}" if haproxy else "-"
            c = f"{statistics.median(v['cpu']) * 1e6:.0f}" if v["cpu"] else "-"
            lost = str(v["lost"]) + (" (smtp-source error)" if v["errors"] else "")
            out.append(f"| {cell_label(*cell)} ({messages}/run) | {name} | {m:.0f} | {rd} | {rh} | {c} | {lost} |")
    return "\n".join(out)


class Contender:
    def __init__(self, name, pid, port, stop):
        self.name, self.pid, self.port, self._stop = name, pid, port, stop

    def stop(self):
        if self._stop:
            try:
                self._stop()
            except Exception as e:  # noqa: BLE001
                print(f"WARNING: stopping {self.name}: {e}", file=sys.stderr)


def start_contenders(names, sink, tmp):
    out = []
    for name in names:
        try:
            if name == "direct":
                out.append(Contender("direct", None, sink.port, None))
            elif name == "haproxy":
                proc, port = start_haproxy(sink.port, tmp)
                if proc is None:
                    raise RuntimeError("haproxy not installed")
                out.append(Contender(name, proc.pid, port, proc.kill))
            elif name == "nginx":
                n = peers.Nginx(sink.port, tmp)
                out.append(Contender(name, n.pid, n.port, n.stop))
            elif name == "postfix":
                p = peers.Postfix(sink.port, tmp)
                out.append(Contender(name, p.pid, p.port, p.stop))
            elif name == "relayguard":
                proc, port = start_relayguard(sink.port, tmp)
                out.append(Contender(name, proc.pid, port, proc.kill))
        except Exception as e:  # noqa: BLE001
            print(f"WARNING: {name} not measured: {e}", file=sys.stderr)
    return out


def idle_table(idle):
    out = ["| contender | idle connections | greeted | RSS KiB/conn | PSS KiB/conn | note |",
           "|---|---|---|---|---|---|"]
    for (name, count), r in idle.items():
        if isinstance(r, str):
            out.append(f"| {name} | {count} | - | - | - | {r} |")
            continue
        pss = f"{r['pss']:.2f}" if r["pss"] is not None else "-"
        out.append(f"| {name} | {count} | {r['greeted']} | {r['rss']:.2f} | {pss} | {r['error'] or ''} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--matrix", choices=["default", "full", "none"], default="default",
                    help="default: a subset of the cells (see DEFAULT_CELLS); full: every size x clients x per-conn")
    ap.add_argument("--sizes", help="comma list of 1k,100k,5m (with --clients/--per-conn: a cross product)")
    ap.add_argument("--clients", help="comma list of parallel clients, e.g. 1,10,50")
    ap.add_argument("--per-conn", help="comma list of messages per connection: 1 and/or 100")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the messages per run (1 msg/conn cells)")
    ap.add_argument("--contenders", default=",".join(ALL_CONTENDERS))
    ap.add_argument("--idle", default="1000,10000", help="comma list of idle connection counts ('' for none)")
    ap.add_argument("--postfix-idle-max", type=int, default=1000,
                    help="Postfix needs one smtpd process per connection: skip it above this count")
    ap.add_argument("--latency", type=int, default=500, help="transactions per contender for the latency probe (0: none)")
    ap.add_argument("--messages", type=int, default=2000, help="--auth-only: sessions x3 per run")
    ap.add_argument("--sessions", type=int, default=10, help="--auth-only: parallel sessions")
    ap.add_argument("--quick", action="store_true", help="1 round, few messages, small idle counts (smoke test)")
    ap.add_argument("--auth-only", action="store_true", help="only the AUTH NTLM / policy benchmark")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.scale, args.latency = 1, 0.1, 50
        args.idle = "200"

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    names = [n for n in args.contenders.split(",") if n]
    if not args.auth_only:
        ensure = [n for n in names if n in peers.PACKAGES]
        if not peers.ensure_packages(ensure):
            names = [n for n in names if n not in ensure or all(peers._installed(p) for p in peers.PACKAGES[n])]
    subprocess.run(["cargo", "build", "--release", "-p", "relayguard", "--bin", "relayguard"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "-p", "relayguard-e2e", "--example", "relayguard-loadgen"],
                   cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="relayguard-bench-")
    sink = Sink()
    if args.auth_only:
        try:
            auth_benchmark(sink, tmp, args.rounds, max(args.messages // 3, 100), args.sessions)
        finally:
            sink.stop()
        return

    if args.sizes or args.clients or args.per_conn:
        sizes = (args.sizes or "1k").split(",")
        clients = [int(x) for x in (args.clients or "10").split(",")]
        per_conn = [int(x) for x in (args.per_conn or "1,100").split(",")]
        cells = [(s, c, p) for s in sizes for p in per_conn for c in clients]
    elif args.matrix == "full":
        cells = [(s, c, p) for s in SIZES for p in (1, 100) for c in (1, 10, 50)]
    elif args.matrix == "none":
        cells = []
    else:
        cells = DEFAULT_CELLS
    for s, _, _ in cells:
        if s not in SIZES:
            sys.exit(f"unknown size {s}: use {','.join(SIZES)}")

    contenders = start_contenders(names, sink, tmp)
    t0 = time.time()
    results, times, idle = {}, None, {}
    try:
        results = run_matrix(cells, contenders, sink, args.rounds, args.scale)
        if args.latency:
            times = probes.latency([(c.name, c.port) for c in contenders], args.latency)
        for count in [int(x) for x in args.idle.split(",") if x]:
            for c in contenders:
                if c.name == "postfix" and count > args.postfix_idle_max:
                    idle[(c.name, count)] = (f"skipped: one smtpd process per connection "
                                             f"(> --postfix-idle-max {args.postfix_idle_max})")
                    continue
                pid = c.pid if c.pid else sink.proc.pid
                label = c.name if c.pid else "direct (smtp-sink)"
                try:
                    idle[(label, count)] = probes.idle_connections(pid, c.port, count)
                except OSError as e:
                    idle[(label, count)] = f"failed: {e}"
                print(f"bench: idle {count}: {label}: {idle[(label, count)]}", file=sys.stderr)
                time.sleep(1.0)
    finally:
        for c in contenders:
            c.stop()
        sink.stop()

    load = os.getloadavg()
    print(f"\nMeasured {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores, load average at the end "
          f"{load[0]:.2f}; {args.rounds} interleaved rounds per cell, medians; run took {time.time() - t0:.0f} s.")
    if results:
        print("\nThroughput (smtp-source -> contender -> smtp-sink; msgs/s = messages at the sink / time until "
              "the last reached it; CPU = run time of every thread of the contender's process tree (schedstat, "
              "ns), reaped children included (ticks), per delivered message; lost = acknowledged or sent but not at the sink, summed over "
              "rounds):\n")
        print(matrix_table(results, args.rounds))
    if times:
        print()
        print(probes.latency_table(times, args.latency))
    if idle:
        print("\nMemory per idle connection after its greeting (delta of RSS / PSS summed over the contender's "
              "processes, divided by the connections greeted):\n")
        print(idle_table(idle))


if __name__ == "__main__":
    main()
