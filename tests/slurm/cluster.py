"""A real two-node slurm cluster on this one machine, for tests.

Debian's slurm-wlm and munge, installed with apt-get when missing. Everything the cluster
writes (munge key and socket, slurm.conf, state, spool, logs) lives under one directory,
and no system service is touched: munged gets its own key and socket, and the slurm
daemons find them through slurm.conf (`AuthInfo=socket=...`). Both nodes, n1 and n2, are
slurmd processes on 127.0.0.1 with their own ports; the daemons run in the foreground as
children of the caller, so they are stopped by the pids started here and nothing else.

By hand (prints the environment to use the cluster, stops it on Enter):

    python tests/slurm/cluster.py /tmp/mycluster
"""
from __future__ import annotations

import getpass
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel")
NODES = ("n1", "n2")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}


class Unavailable(Exception):
    """A real slurm cannot run here; the message says why (with the daemons' last log lines)."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if not _which(b)]


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def ensure_installed(timeout: int = 900) -> None:
    """apt-get install slurm-wlm and munge unless every binary is already there."""
    if not missing_binaries():
        return
    if os.geteuid() != 0 or not _which("apt-get"):
        raise Unavailable(f"slurm is not installed ({', '.join(missing_binaries())} missing) "
                          "and apt-get cannot run here (needs root on Debian)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    wait_lock = ["-o", "DPkg::Lock::Timeout=120"]  # another apt (unattended upgrades) may hold it
    for cmd in (["apt-get", *wait_lock, "update", "-q"],
                ["apt-get", *wait_lock, "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
            raise Unavailable(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    if missing_binaries():
        raise Unavailable(f"installed {PACKAGES} but still missing {missing_binaries()}")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.procs: dict[str, subprocess.Popen] = {}
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    # -- configuration --------------------------------------------------------------------

    def env(self, base: dict | None = None) -> dict:
        """`base` (default os.environ) set up for slurm commands against this cluster."""
        env = dict(os.environ if base is None else base)
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            del env[k]  # an outer allocation's variables would leak into this cluster's jobs
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + os.pathsep + "/usr/sbin"
        return env

    def _write_config(self) -> None:
        for d in ("etc", "munge", "state", "log", "run", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        user = getpass.getuser()
        r = self.root
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={self.hostname} Port={p} CPUs=1 RealMemory=1000 State=UNKNOWN"
            for n, p in zip(NODES, node_ports))
        self.conf.write_text(f"""\
ClusterName=shardtune-test
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
# no cgroups: plain process tracking works in containers and on any kernel
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# the job script asks for --gpus-per-node, a cons_tres option (the test overrides it with 0)
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=600
SlurmdTimeout=60
SlurmctldTimeout=60
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)

    # -- lifecycle ------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                            stdin=subprocess.DEVNULL)
        out.close()

    def start(self, timeout: float = 90) -> None:
        """Start munged, slurmctld and one slurmd per node; return once every node is idle."""
        ensure_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged refuses group/world-writable parents
        self._write_config()
        m = self.root / "munge"
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), 20, "munged did not create its socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for n in NODES:
            self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
        self._wait(self._all_idle, timeout, "the nodes did not become idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise Unavailable(f"{', '.join(dead)} exited during startup\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.5)
        raise Unavailable(f"{what} within {timeout:.0f}s\n{self.log_tail()}")

    def run(self, args: list[str], timeout: float = 30, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """A slurm command against this cluster; `env` is the base environment (see env())."""
        args = [_which(args[0]) or args[0], *args[1:]]
        return subprocess.run(args, capture_output=True, text=True, env=self.env(env), timeout=timeout, cwd=cwd)

    def submit(self, args: list[str], env: dict | None = None, cwd: str | Path | None = None) -> str:
        """sbatch ARGS; returns the job id."""
        proc = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def wait_job(self, job_id: str, timeout: float) -> str:
        """Wait until the job has ended; returns `scontrol show job` for it (JobState=..., ExitCode=...).

        Polls every half second: `sbatch --wait` backs off to half-minute polls."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.run(["scontrol", "show", "job", job_id]).stdout
            state = re.search(r"JobState=(\S+)", info)
            if state and state.group(1) in ENDED:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state.group(1) if state else '?'} after {timeout:.0f}s")
            time.sleep(0.5)

    def states(self) -> dict[str, str]:
        try:
            proc = self.run(["sinfo", "-h", "-N", "-o", "%N %t"])
        except subprocess.TimeoutExpired:
            return {}
        return dict(l.split() for l in proc.stdout.splitlines() if len(l.split()) == 2)

    def _all_idle(self) -> bool:
        states = self.states()
        return all(states.get(n) == "idle" for n in NODES)

    def log_tail(self, lines: int = 8) -> str:
        """The last lines of each daemon's log (its stdout where it wrote no log file)."""
        parts = []
        for out in sorted((self.root / "log").glob("*.stdout")):
            log = out.with_suffix(".log")
            f = log if log.is_file() and log.stat().st_size else out
            text = f.read_text(errors="replace").splitlines()[-lines:]
            if text:
                parts.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel any job, then end the daemons started here (by pid), newest first."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run(["scancel", "--full", "--user", getpass.getuser()], timeout=10)
                self._wait_quiet(lambda: not self.run(["squeue", "-h"], timeout=10).stdout.strip(), 20)
            except (subprocess.SubprocessError, OSError):
                pass
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self.procs.clear()

    @staticmethod
    def _wait_quiet(ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not ready():
            time.sleep(0.5)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` stops the daemons
    cluster = Cluster(sys.argv[1])
    try:
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}\n{cluster.states()}\npress Enter to stop")
        input()
    finally:
        cluster.stop()
