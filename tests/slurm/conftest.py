"""A throw-away two-node SLURM cluster on this host, for the tests marked ``slurm``.

munged, slurmctld and two slurmd (nodes n1 and n2, both at 127.0.0.1 on their own ports)
run from one temporary folder that holds their config, key, state, logs and the jobs'
files; at the end every job is cancelled, every daemon (and any process a job left) is
killed by pid, and the folder is removed. Debian's packages are installed with apt when
``sbatch`` is missing (CI runs as root on a fresh Debian 12); where that is impossible the
tests skip and say why.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ["slurmd", "slurmctld", "slurm-client", "munge"]
# job states that are final (a requeue makes the job PENDING again)
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
         "OUT_OF_MEMORY")
COMMANDS = ["sbatch", "scancel", "scontrol", "sinfo", "squeue", "srun", "slurmctld", "slurmd", "munged"]


def _missing() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None]


def _install() -> str | None:
    """Install SLURM and munge when missing; the reason to skip, or None."""
    if not _missing():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"SLURM is not installed ({', '.join(_missing())} missing) and apt-get as root is not available"
    # Keep the packages' scripts from starting the system's own munged/slurmd/slurmctld.
    policy = Path("/usr/sbin/policy-rc.d")
    ours = False
    if not policy.exists():
        try:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            ours = True
        except OSError:
            pass
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    try:
        out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "apt-get install of SLURM timed out"
    finally:
        if ours:
            policy.unlink(missing_ok=True)
    if out.returncode != 0 or _missing():
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
        return f"could not install SLURM with apt-get: {last[0]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Two nodes, n1 and n2, on this host; ``run`` and ``submit`` talk to it."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: list[subprocess.Popen] = []
        self.log_files: list = []

    @staticmethod
    def free_port() -> int:
        return _free_port()

    def start(self) -> None:
        r, host = self.root, socket.gethostname().split(".")[0]
        for d in ("state", "spool/n1", "spool/n2", "logs"):
            (r / d).mkdir(parents=True)
        key = r / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        ctld_port, n1_port, n2_port = (_free_port() for _ in range(3))
        self.conf.write_text(f"""\
ClusterName=titantest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/logs/slurmctld.log
SlurmdLogFile={r}/logs/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
SchedulerParameters=sched_interval=1
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=2
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=2
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")
        self._daemon("munged", "munged", "-F", "--force", f"--key-file={key}", f"--socket={r}/munge.sock",
                     f"--pid-file={r}/munged.pid", f"--log-file={r}/logs/munged.log", f"--seed-file={r}/munged.seed")
        self._wait(lambda: (r / "munge.sock").exists(), "munged to create its socket")
        self._daemon("slurmctld", "slurmctld", "-D", "-i", "-f", str(self.conf))
        for node in ("n1", "n2"):
            self._daemon(f"slurmd-{node}", "slurmd", "-D", "-N", node, "-f", str(self.conf))
        self._wait(self._idle, "both nodes to be idle in sinfo")

    def _daemon(self, name: str, *cmd: str) -> None:
        log = open(self.root / "logs" / f"{name}.out", "w")
        self.log_files.append(log)
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))

    def _idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        return out[1::2] == ["idle", "idle"] if len(out) == 4 else False

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"SLURM test cluster: waited for {what}; exited: {dead}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((self.root / "logs").glob("*")))

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()}")
        return out

    def submit(self, *args: str, env: dict[str, str], cwd: Path) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], env={**env, "SLURM_CONF": str(self.conf)},
                             cwd=cwd, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)}: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, ExitCode, ...)."""
        text = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def ended(self, job_id: int) -> bool:
        return self.job(job_id)["JobState"] in ENDED

    def wait_job(self, job_id: int, timeout: float = 300) -> dict[str, str]:
        """Wait until the job has ended; its fields."""
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["JobState"] not in ENDED:
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id), check=False)
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout:.0f}s")
            time.sleep(0.25)
        return info

    def requeue(self, job_id: int, timeout: float = 60) -> None:
        """``scontrol requeue`` an ended job and start it at once (not after SLURM's hold-off)."""
        self.run("scontrol", "requeue", str(job_id))
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["JobState"] not in ("RUNNING", *ENDED) and time.monotonic() < deadline:
            if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            time.sleep(0.25)

    def stop(self) -> None:
        """Cancel every job, kill what the jobs and daemons left, stop the daemons (by pid)."""
        if not self.procs:
            return
        if all(p.poll() is None for p in self.procs):
            self.run("scancel", "--partition=test", check=False)
            deadline = time.monotonic() + 15
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.25)
        for pid in self._job_pids():  # left by a job: slurmstepd, torchrun and its workers
            _kill(pid, signal.SIGKILL)
        munged, slurm = self.procs[0], self.procs[1:]
        if slurm[0].poll() is None:
            self.run("scontrol", "shutdown", check=False)  # slurmctld and both slurmd
        munged.terminate()
        for p in [*slurm, munged]:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:  # slurmctld at times hangs 10 s or more in its shutdown
                p.kill()
                p.wait()
        self.procs.clear()
        for f in self.log_files:
            f.close()

    def _job_pids(self) -> list[int]:
        """Processes whose environment names this cluster's config: the jobs' and the daemons'
        children (not the daemons, stopped after)."""
        mark = f"SLURM_CONF={self.conf}".encode()
        daemons = {p.pid for p in self.procs}
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in daemons or int(entry.name) == os.getpid():
                continue
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
        return pids


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def slurm_cluster():
    """The running two-node cluster (installed first if needed), stopped and removed at the end."""
    started = time.monotonic()
    reason = _install()
    if reason:
        pytest.skip(reason)
    installed = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="titan-slurm-"))
    cluster = Cluster(root)

    def finish() -> None:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(finish)  # also when the session ends without running finalizers
    try:
        cluster.start()
    except BaseException:
        finish()
        raise
    print(f"\nSLURM test cluster: install {installed - started:.1f}s, start {time.monotonic() - installed:.1f}s")
    yield cluster
    finish()
    atexit.unregister(finish)
