#!/usr/bin/env python3
"""Soak test (issue 7, resource bounds): memory and file descriptors of the
gateway stay flat over a long run at moderate, mixed load.

One RelayGuard (the release build, or --binary) in front of one smtp-sink
(bench.Sink, which counts what reached it). For --duration seconds, three
loads run side by side:

* smtp-source batches, one after the other, paced to --rate messages/s on
  average (a batch runs at full speed, then the loop sleeps): 1 KB one
  message per connection over 10 sessions; 1 KB 20 messages per connection
  (-d) over 10 sessions; every fifth batch 100 KB messages over 5 sessions.
  smtp-source exits non-zero on any reply other than 2xx after the end of
  DATA, so a batch that exited 0 had every message acknowledged (a batch
  is counted when it has exited: a sample taken during one may show more
  messages at the sink than acknowledged).
* idle connections: every --idle-period seconds, --idle sockets connect,
  read the greeting, sit for --idle-hold seconds and close
  (probes.idle_connections).
* aborted transactions, --drops per second, in turn: close after RCPT;
  close right after the 354; close in the middle of the body (FIN); the
  same with a RST; close after a body ending in CRLF "." without its CRLF;
  close after 64 KB of body. None of them may reach the sink.

Every --interval seconds the gateway's VmRSS, PSS (/proc/PID/smaps_rollup),
open fds (/proc/PID/fd), threads and CPU are sampled. The first --warmup
seconds are warm-up: "start" is the sample taken when it ends, "end" the
last sample under load. After the load the idle sockets are closed, and
the gateway is sampled again for --settle seconds (longer than the backend
pool's 30 s idle timeout).

Fails (exit 1) if an acknowledged message did not reach the sink (or more
reached it than were acknowledged), if a batch failed, if the gateway died,
if fds 5 s after the load (idle sockets closed) exceed fds at start by more
than --fd-slack, or if RSS at end exceeds RSS at start by more than
--rss-growth-pct percent plus --rss-growth-mib MiB.

Usage: python3 tests/bench/soak.py [--duration 600] [--binary PATH] [--rate 600]
       python3 tests/bench/soak.py --duration 60      (quick mode)
"""

import argparse
import collections
import os
import re
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import probes  # noqa: E402

KIB = 1024
# (label, sessions, messages per batch, length, several messages per connection)
BATCHES = [
    ("1 KB, 1 msg/conn", 10, 200, 1 * KIB, False),
    ("1 KB, 20 msg/conn", 10, 200, 1 * KIB, True),
    ("1 KB, 1 msg/conn", 10, 200, 1 * KIB, False),
    ("1 KB, 20 msg/conn", 10, 200, 1 * KIB, True),
    ("100 KB, 1 msg/conn", 5, 20, 100 * KIB, False),
]
DROPS = ["after RCPT", "after 354", "mid-body FIN", "mid-body RST", "after CRLF . without CRLF",
         "after 64 KB of body"]


def status_fields(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    return out


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_breakdown(pid, port, sink_port):
    """What the gateway's fds are: its listener, connections from clients,
    connections to the sink (backend), other sockets (not TCP, or closed
    while sampling), other files (epoll, eventfd, pipes, /dev/null...)."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    # Read after the fds were listed, so that every socket listed is here
    # unless it was closed in between.
    tcp = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    x = line.split()
                    tcp[x[9]] = (int(x[1].rsplit(":", 1)[1], 16), int(x[2].rsplit(":", 1)[1], 16), x[3])
        except OSError:
            pass
    out = collections.Counter()
    for target in targets:
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if not m:
            out["other files"] += 1
            continue
        local, remote, state = tcp.get(m.group(1), (None, None, None))
        if state == "0A":
            out["listener"] += 1
        elif local == port:
            out["from clients"] += 1
        elif remote == sink_port:
            out["to the sink"] += 1
        else:
            out["other sockets"] += 1
    return ", ".join(f"{k} {v}" for k, v in sorted(out.items()))


ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOG_TIME = re.compile(r"^\S+Z\s+")


def log_summary(path):
    """The gateway's log lines (warn and above) counted by message, without
    timestamps and fields."""
    with open(path, "rb") as f:
        lines = [ANSI.sub("", line) for line in f.read().decode(errors="replace").splitlines()]
    counts = collections.Counter(re.sub(r"\s*session=\S+", "", LOG_TIME.sub("", line)).strip() for line in lines)
    return len(lines), counts


class Load:
    """The three loads, each in its own thread, with their counters."""

    def __init__(self, port, pid, sink, args):
        self.port, self.pid, self.sink, self.args = port, pid, sink, args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acknowledged = 0
        self.batches = {}       # label -> [ok batches, messages acknowledged]
        self.failed = []        # (label, messages, stderr tail)
        self.idle_held = 0      # sockets the idle load holds right now (0 or --idle)
        self.idle_cycles = 0
        self.idle_opened = 0
        self.idle_greeted = 0
        self.idle_errors = []
        self.drops = {d: 0 for d in DROPS}
        self.drop_errors = []
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._batches, self._idle, self._drops)]

    def start(self):
        self.t0 = time.time()
        for t in self.threads:
            t.start()

    def finish(self):
        """Stops every load; returns when the last batch has exited and the
        idle sockets are closed."""
        self.stop.set()
        for t in self.threads:
            t.join()

    def _batches(self):
        i = 0
        while not self.stop.is_set():
            label, sessions, messages, length, per_conn = BATCHES[i % len(BATCHES)]
            i += 1
            _, r = bench.smtp_source(self.port, sessions, messages, length, per_conn, check=False)
            with self.lock:
                if r.returncode == 0:
                    self.acknowledged += messages
                    b = self.batches.setdefault(label, [0, 0])
                    b[0] += 1
                    b[1] += messages
                    sent = self.acknowledged
                else:
                    self.failed.append((label, messages, r.stderr.decode(errors="replace").strip()[-200:]))
                    print(f"soak: WARNING: batch {label} failed: {self.failed[-1][2]}", file=sys.stderr)
                    sent = self.acknowledged + sum(f[1] for f in self.failed)
            # Pace: sleep until the average rate since the start is --rate.
            self.stop.wait(max(0.0, self.t0 + sent / self.args.rate - time.time()))

    def _idle(self):
        # The first hold starts after the warm-up sample, so that "fds at
        # start" never counts idle sockets.
        if self.stop.wait(self.args.warmup + 3):
            return
        while not self.stop.is_set():
            cycle_start = time.time()
            with self.lock:
                self.idle_held = self.args.idle
            try:
                r = probes.idle_connections(self.pid, self.port, self.args.idle, settle=self.args.idle_hold,
                                            timeout=20.0)
                with self.lock:
                    self.idle_cycles += 1
                    self.idle_opened += self.args.idle
                    self.idle_greeted += r["greeted"]
                    if r["error"]:
                        self.idle_errors.append(r["error"])
                        print(f"soak: WARNING: idle connections: {r['error']}", file=sys.stderr)
            except OSError as e:
                with self.lock:
                    self.idle_errors.append(str(e))
            finally:
                with self.lock:
                    self.idle_held = 0
            self.stop.wait(max(0.0, cycle_start + self.args.idle_period - time.time()))

    def _drop_one(self, kind):
        line = b"y" * 76 + b"\r\n"
        c = probes._Client(self.port)  # greeting + EHLO
        try:
            for cmd, want in ((b"MAIL FROM:<dropper@example.test>\r\n", 250),
                              (b"RCPT TO:<rcpt@example.test>\r\n", 250)):
                code = c.cmd(cmd)
                if code != want:
                    raise RuntimeError(f"{cmd.strip().decode()} answered {code}")
            if kind != "after RCPT":
                code = c.cmd(b"DATA\r\n")
                if code != 354:
                    raise RuntimeError(f"DATA answered {code}")
                head = b"Subject: aborted " + kind.encode() + b"\r\n\r\n"
                if kind in ("mid-body FIN", "mid-body RST"):
                    c.sock.sendall(head + line * 26 + b"half a li")
                elif kind == "after CRLF . without CRLF":
                    c.sock.sendall(head + line * 10 + b".")
                elif kind == "after 64 KB of body":
                    c.sock.sendall(head + line * 840)
                time.sleep(0.05)  # let the gateway pass it on before the close
            if kind == "mid-body RST":
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        finally:
            c.sock.close()

    def _drops(self):
        i = 0
        while not self.stop.wait(1.0 / self.args.drops):
            kind = DROPS[i % len(DROPS)]
            i += 1
            try:
                self._drop_one(kind)
                with self.lock:
                    self.drops[kind] += 1
            except (OSError, RuntimeError, ValueError) as e:
                with self.lock:
                    self.drop_errors.append(f"{kind}: {e}")
                print(f"soak: WARNING: aborted transaction ({kind}): {e}", file=sys.stderr)


def sample(t, phase, pid, load, sink, prev):
    st = status_fields(pid)
    cpu = bench.cpu_seconds(pid)
    with load.lock:
        acked, held = load.acknowledged, load.idle_held
    with sink.lock:
        delivered = sink.count
    s = {"t": t, "phase": phase, "rss": st["VmRSS"], "pss": pss_kib(pid), "fds": fd_count(pid),
         "threads": st["Threads"], "idle": held, "acked": acked, "delivered": delivered, "cpu": cpu,
         "wall": time.time(), "fd_kinds": fd_breakdown(pid, load.port, sink.port)}
    s["cpu_pct"] = (100.0 * (cpu - prev["cpu"]) / (s["wall"] - prev["wall"])) if prev else 0.0
    print(f"soak: t={t:4.0f}s {phase:8} RSS {s['rss']} KiB, PSS {s['pss']} KiB, fds {s['fds']}, "
          f"threads {s['threads']}, idle held {held}, acked {acked}, delivered {delivered}, "
          f"CPU {s['cpu_pct']:.0f}% ({s['fd_kinds']})", file=sys.stderr)
    return s


def samples_table(samples):
    out = ["| t (s) | phase | RSS KiB | PSS KiB | fds | threads | idle sockets held | acknowledged | "
           "at the sink | gateway CPU % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in samples:
        pss = s["pss"] if s["pss"] is not None else "-"
        out.append(f"| {s['t']:.0f} | {s['phase']} | {s['rss']} | {pss} | {s['fds']} | {s['threads']} | "
                   f"{s['idle']} | {s['acked']} | {s['delivered']} | {s['cpu_pct']:.0f} |")
    return "\n".join(out)


def slope_kib_per_min(points):
    """Least-squares slope of (seconds, KiB) points, in KiB per minute."""
    if len(points) < 2:
        return 0.0
    mt = statistics.fmean(p[0] for p in points)
    mv = statistics.fmean(p[1] for p in points)
    den = sum((p[0] - mt) ** 2 for p in points)
    return 60.0 * sum((p[0] - mt) * (p[1] - mv) for p in points) / den if den else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=600, help="seconds of load, warm-up included")
    ap.add_argument("--warmup", type=int, default=30, help="seconds before the 'start' sample")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--settle", type=int, default=40, help="seconds sampled after the load")
    ap.add_argument("--binary", default=os.path.join(bench.ROOT, "target", "release", "relayguard"))
    ap.add_argument("--rate", type=float, default=600.0, help="average messages per second")
    ap.add_argument("--idle", type=int, default=300, help="idle connections per cycle")
    ap.add_argument("--idle-hold", type=float, default=15.0, help="seconds the idle connections sit")
    ap.add_argument("--idle-period", type=float, default=30.0, help="seconds between idle cycles")
    ap.add_argument("--drops", type=float, default=2.0, help="aborted transactions per second")
    ap.add_argument("--rss-growth-pct", type=float, default=20.0)
    ap.add_argument("--rss-growth-mib", type=float, default=4.0)
    ap.add_argument("--fd-slack", type=int, default=20)
    args = ap.parse_args()
    if args.duration < args.warmup + 2 * args.interval:
        sys.exit("--duration must leave at least two samples after --warmup")
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"{args.binary}: not an executable (build with cargo build --release, or pass --binary)")

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = tempfile.mkdtemp(prefix="relayguard-soak-")
    log_path = os.path.join(tmp, "relayguard.log")
    sink = bench.Sink()
    with open(log_path, "wb") as log:
        gw, port = bench.start_relayguard(sink.port, tmp, binary=args.binary, stderr=log)
    pid = gw.pid
    load = Load(port, pid, sink, args)
    samples = []
    problems = []
    print(f"soak: {args.binary} (pid {pid}) on port {port}, sink on {sink.port}, {args.duration} s of load, "
          f"log {log_path}", file=sys.stderr)
    try:
        time.sleep(1.0)
        samples.append(sample(0, "before", pid, load, sink, None))
        load.start()
        t0 = load.t0
        n = 1
        while True:
            t = n * args.interval
            if t > args.duration:
                break
            time.sleep(max(0.0, t0 + t - time.time()))
            if gw.poll() is not None:
                problems.append(f"the gateway exited with status {gw.returncode} at t={t:.0f} s")
                break
            phase = "warm-up" if t < args.warmup else "load"
            samples.append(sample(t, phase, pid, load, sink, samples[-1]))
            n += 1
        end_t = time.time() - t0
        load.finish()
        stop_t = time.time() - t0
        # Every acknowledged message must reach the sink.
        sink.wait_for(load.acknowledged, timeout=30)
        time.sleep(5.0)
        if gw.poll() is None:
            samples.append(sample(time.time() - t0, "after", pid, load, sink, samples[-1]))
            settle_end = time.time() + args.settle
            while time.time() + args.interval <= settle_end + 0.5 and gw.poll() is None:
                time.sleep(args.interval)
                samples.append(sample(time.time() - t0, "settle", pid, load, sink, samples[-1]))
        elif not problems:
            problems.append(f"the gateway exited with status {gw.returncode} after the load")
    finally:
        load.stop.set()
        gw.kill()
        gw.wait()
        sink.stop()

    with sink.lock:
        delivered = sink.count
    acked = load.acknowledged
    measured = [s for s in samples if s["phase"] == "load"]
    if not measured:
        print(samples_table(samples))
        sys.exit("soak: FAIL: no sample under load after the warm-up: " + "; ".join(problems))
    start, end = measured[0], measured[-1]
    after = next((s for s in samples if s["phase"] == "after"), None)
    final = samples[-1]
    half = len(measured) // 2
    first_med = statistics.median(s["rss"] for s in measured[:max(half, 1)])
    second_med = statistics.median(s["rss"] for s in measured[half:])
    rss_max = max(s["rss"] for s in samples)
    rss_max_t = next(s["t"] for s in samples if s["rss"] == rss_max)
    slope = slope_kib_per_min([(s["t"], s["rss"]) for s in measured])
    limit = start["rss"] * (1 + args.rss_growth_pct / 100) + args.rss_growth_mib * 1024
    load_cpu = (end["cpu"] - samples[0]["cpu"]) / max(end["wall"] - samples[0]["wall"], 1e-9)

    lost = acked - delivered
    if delivered < acked:
        problems.append(f"{lost} acknowledged messages did not reach the sink")
    elif delivered > acked and not load.failed:
        problems.append(f"{delivered - acked} more messages reached the sink than were acknowledged "
                        "(an aborted transaction was delivered?)")
    if load.failed:
        problems.append(f"{len(load.failed)} smtp-source batches failed (first: {load.failed[0]})")
    if after is None:
        problems.append("no sample after the load")
    elif after["fds"] - start["fds"] > args.fd_slack:
        problems.append(f"fds after the load {after['fds']} exceed fds at start {start['fds']} by more than "
                        f"{args.fd_slack}")
    if end["rss"] > limit:
        problems.append(f"RSS at end {end['rss']} KiB exceeds RSS at start {start['rss']} KiB + "
                        f"{args.rss_growth_pct:.0f}% + {args.rss_growth_mib:g} MiB = {limit:.0f} KiB")

    def pss(s):
        return f"{s['pss']} KiB" if s["pss"] is not None else "-"

    log_count, log_kinds = log_summary(log_path)
    print(f"\nSoak: {end_t:.0f} s of load (warm-up {args.warmup} s), samples every {args.interval:g} s; "
          f"{os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.2f}; binary {args.binary}\n")
    print(samples_table(samples))
    print("\nSummary:\n")
    print(f"* RSS: start (t={start['t']:.0f} s) {start['rss']} KiB, end of load (t={end['t']:.0f} s) "
          f"{end['rss']} KiB ({end['rss'] - start['rss']:+d} KiB), max {rss_max} KiB (t={rss_max_t:.0f} s), "
          f"after the load {final['rss']} KiB; medians of the first / second half of the samples under load "
          f"{first_med:.0f} / {second_med:.0f} KiB ({second_med - first_med:+.0f} KiB, "
          f"{100 * (second_med - first_med) / first_med:+.1f}%); least-squares slope {slope:+.1f} KiB/min; "
          f"limit at end {limit:.0f} KiB")
    print(f"* PSS: start {pss(start)}, end of load {pss(end)}, after the load {pss(final)}")
    print(f"* fds: before the load {samples[0]['fds']}, start {start['fds']}, end of load {end['fds']}, "
          f"5 s after the load (idle sockets closed) {after['fds'] if after else '-'}, "
          f"after {final['t'] - stop_t:.0f} s of rest {final['fds']}; threads {samples[0]['threads']} -> "
          f"{final['threads']}")
    print(f"* fds by kind: before the load: {samples[0]['fd_kinds']}; start: {start['fd_kinds']}; "
          f"after the rest: {final['fd_kinds']}")
    kinds = ", ".join(f"{label}: {b[1]} in {b[0]} batches" for label, b in load.batches.items())
    print(f"* messages: acknowledged {acked}, at the sink {delivered}, lost {max(lost, 0)}"
          f"{f', extra {-lost}' if lost < 0 else ''}; {acked / max(end_t, 1e-9):.0f} msgs/s on average "
          f"({kinds}); failed batches {len(load.failed)}")
    print(f"* idle connections: {load.idle_cycles} cycles of {args.idle} held {args.idle_hold:g} s, "
          f"{load.idle_greeted} of {load.idle_opened} greeted"
          f"{'; errors: ' + '; '.join(load.idle_errors[:3]) if load.idle_errors else ''}")
    print(f"* aborted transactions: {sum(load.drops.values())} "
          f"({', '.join(f'{k}: {v}' for k, v in load.drops.items())}); unexpected replies or errors "
          f"{len(load.drop_errors)}{': ' + '; '.join(load.drop_errors[:3]) if load.drop_errors else ''}")
    print(f"* gateway CPU over the load: {100 * load_cpu:.0f}% of one core on average")
    print(f"* gateway log (RELAYGUARD_LOG=warn): {log_count} lines"
          + "".join(f"\n  * {n} x `{text}`" for text, n in log_kinds.most_common(8)))
    if problems:
        print("\nsoak: FAIL: " + "; ".join(problems))
        sys.exit(1)
    print("\nsoak: PASS")


if __name__ == "__main__":
    main()
