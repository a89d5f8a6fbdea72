"""The peers RelayGuard is measured against (issue 7): nginx's mail proxy and
a Postfix relay, each a private instance in a temporary directory, plus the
process-tree accounting (CPU, RSS, PSS) that multi-process peers need.

Nothing here touches the system's own nginx or Postfix: nginx runs with
`-p`/`-c`/`-e` pointing into the temp dir (pid, logs and temp paths too),
and Postfix with its own config_directory, queue_directory and
data_directory (`postfix -c DIR start`), listening on a loopback port only.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

# Debian packages of the peers; installed by ensure_packages() if missing.
PACKAGES = {
    "haproxy": ["haproxy"],
    "nginx": ["nginx-light", "libnginx-mod-mail"],
    "postfix": ["postfix"],
}
NGINX_MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def _installed(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", pkg], capture_output=True, text=True)
    return r.returncode == 0 and "install ok installed" in r.stdout


def ensure_packages(names):
    """Installs the Debian packages of the named peers if missing (as
    tests/run does). Without root, says what to install and returns False."""
    missing = [p for n in names for p in PACKAGES.get(n, []) if not _installed(p)]
    if not missing:
        return True
    if os.geteuid() != 0:
        print(f"bench: missing packages, install them with: sudo apt-get install --no-install-recommends "
              f"{' '.join(missing)}", file=sys.stderr)
        return False
    print(f"bench: installing {' '.join(missing)}", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Postfix unconfigured: only its programs and a private instance are used.
    subprocess.run(["debconf-set-selections"], input="postfix postfix/main_mailer_type select No configuration\n",
                   text=True, check=False)
    r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                       stdin=subprocess.DEVNULL, env=env, stdout=subprocess.DEVNULL)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                           stdin=subprocess.DEVNULL, env=env, stdout=subprocess.DEVNULL)
    return r.returncode == 0


# ---------------------------------------------------------------- /proc accounting

def _stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        head, tail = f.read().rsplit(")", 1)
    return tail.split()


def descendants(root):
    """root and every process below it (by ppid), from /proc."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(_stat(d)[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _task_cpu_ns(pid):
    """CPU time of each live thread of pid in nanoseconds (the first field
    of /proc/PID/task/TID/schedstat), or None without schedstats."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        except (OSError, IndexError, ValueError):
            return None
    return total


def tree_cpu_seconds(root):
    """CPU time of root and all its live descendants, plus cutime+cstime
    (the time of children they already reaped: Postfix's master reaps its
    short-lived smtpd/cleanup/smtp processes, nginx's master its workers).

    Live processes are read to the nanosecond from each thread's
    schedstat: utime+stime come in clock ticks (10 ms), too coarse for a
    run of a second at tens of microseconds per message. Reaped children
    only exist as ticks."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in descendants(root):
        try:
            f = _stat(pid)
        except (OSError, IndexError, ValueError):
            continue
        try:
            reaped = int(f[13]) + int(f[14])
            live = int(f[11]) + int(f[12])
        except (IndexError, ValueError):
            continue
        ns = _task_cpu_ns(pid)
        total += reaped / ticks + (ns / 1e9 if ns is not None else live / ticks)
    return total


def tree_memory_kib(root):
    """(RSS, PSS) in KiB summed over root and its descendants. PSS comes from
    /proc/PID/smaps_rollup (None if the kernel lacks it)."""
    rss, pss, have_pss = 0, 0, True
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
        except OSError:
            continue
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                        break
        except OSError:
            have_pss = False
    return rss, (pss if have_pss else None)


# ---------------------------------------------------------------- nginx mail proxy

class Nginx:
    """nginx's mail proxy, `smtp_auth none`, `xclient off`; the auth_http
    answer (Auth-Status OK, Auth-Server/Auth-Port = the sink) comes from an
    `http` server block of the same nginx on loopback. Runs as a child
    process (`daemon off; master_process on;`), so pid is the master."""

    def __init__(self, sink_port, tmp, worker_connections=25000):
        self.port = free_port()
        auth_port = free_port()
        d = os.path.join(tmp, "nginx")
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)
        cfg = os.path.join(d, "nginx.conf")
        user = "user nobody nogroup;" if os.geteuid() == 0 else ""
        with open(cfg, "w") as f:
            f.write(f"""load_module {NGINX_MAIL_MODULE};
{user}
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile {2 * worker_connections + 100};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{auth_port};
        location = /auth {{
            add_header Auth-Status OK;
            add_header Auth-Server 127.0.0.1;
            add_header Auth-Port {sink_port};
            return 204;
        }}
    }}
}}
mail {{
    server_name bench.nginx.test;
    auth_http 127.0.0.1:{auth_port}/auth;
    xclient off;
    proxy_pass_error_message on;
    server {{
        listen 127.0.0.1:{self.port};
        protocol smtp;
        smtp_auth none;
    }}
}}
""")
        self.dir = d
        self.proc = subprocess.Popen(["nginx", "-p", d, "-c", cfg, "-e", f"{d}/error.log"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"nginx did not start: {self.log_tail()}")
        self.pid = self.proc.pid

    def log_tail(self):
        try:
            with open(f"{self.dir}/error.log") as f:
                return f.read()[-1000:]
        except OSError:
            return ""

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------- Postfix relay

POSTFIX_MASTER_CF = """\
{listen} inet n - n - {smtpd_limit} smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix instance relaying (store-and-forward) everything for
    example.test to the sink: own config_directory, queue_directory and
    data_directory in the temp dir, started with `postfix -c DIR start`,
    listening on one loopback port only (never port 25), no local delivery,
    fast queue settings. pid is its master (from pid/master.pid)."""

    def __init__(self, sink_port, tmp, smtpd_limit=1200):
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix instance needs root")
        self.port = free_port()
        d = os.path.join(tmp, "postfix")
        self.conf = os.path.join(d, "etc")
        queue = os.path.join(d, "queue")
        data = os.path.join(d, "data")
        for p in (self.conf, queue, data):
            os.makedirs(p, exist_ok=True)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep the postfix user out
        os.chmod(d, 0o755)
        shutil.chown(data, "postfix")
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(f"""compatibility_level = 3.6
config_directory = {self.conf}
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = relay.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 no local delivery
alias_maps =
alias_database =
relay_domains = example.test
relayhost = [127.0.0.1]:{sink_port}
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions =
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_event_limit_exceptions = 127.0.0.0/8
smtpd_tls_security_level = none
smtp_tls_security_level = none
default_process_limit = 200
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
message_size_limit = 0
biff = no
notify_classes =
maillog_file_prefixes = {d}
maillog_file = {d}/maillog
smtp_address_preference = ipv4
""")
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER_CF.format(listen=f"127.0.0.1:{self.port}", smtpd_limit=smtpd_limit))
        self.dir = d
        r = subprocess.run(["postfix", "-c", self.conf, "start"], capture_output=True, text=True)
        if r.returncode != 0:
            try:
                with open(os.path.join(d, "maillog")) as f:
                    log = f.read()[-1500:]
            except OSError:
                log = ""
            raise RuntimeError(f"postfix -c {self.conf} start failed: {r.stderr.strip()} {log}")
        try:
            wait_port(self.port)
        except RuntimeError:
            self.stop()
            raise
        with open(os.path.join(queue, "pid", "master.pid")) as f:
            self.pid = int(f.read().strip())

    def queue_empty(self):
        for sub in ("incoming", "active", "deferred", "maildrop"):
            p = os.path.join(self.dir, "queue", sub)
            for _root, _dirs, files in os.walk(p):
                if files:
                    return False
        return True

    def stop(self):
        subprocess.run(["postfix", "-c", self.conf, "stop"], capture_output=True)
        time.sleep(0.3)
        try:
            os.kill(self.pid, 0)
            subprocess.run(["postfix", "-c", self.conf, "abort"], capture_output=True)
        except (OSError, AttributeError):
            pass
