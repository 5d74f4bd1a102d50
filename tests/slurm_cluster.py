"""A real SLURM cluster on this machine for tests: munged, slurmctld and slurmd.

One node on localhost, or one slurmd in each node of an emulated cluster
(``mpicnn.cluster.netns``), slurmctld on the bridge: then jobs really span nodes.
Everything (munge key and socket, configuration, state, logs) lives in one private
directory, and the daemons run in the foreground as children of this process, so they are
stopped by process id and never outlive the test session. Client commands find the
cluster through ``SLURM_CONF``.

``python tests/slurm_cluster.py DIR`` starts a cluster by hand and keeps it until Ctrl-C.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from mpicnn.cluster.startup import mpich_step_files

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "sinfo", "srun")
PACKAGES = ("slurm-wlm", "munge")
JOB_IDS, STEPS = 100, 16          # job ids a test cluster may use; steps (relaunches) per job
MAX_JOB_ID = 0x03FFFFFF           # SLURM's largest job id
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class Unavailable(Exception):
    """SLURM's programs are not installed here."""


class NotRoot(Unavailable):
    """The test cluster's daemons run as root, and this is not root."""


def find(program: str) -> str | None:
    return shutil.which(program) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin") if (p := Path(d) / program).exists()), None)


def check_installed() -> None:
    """Raise Unavailable unless Debian's slurm-wlm and munge are installed (``.ci/run``
    installs them) and this is root (the daemons run as root)."""
    missing = [p for p in DAEMONS + CLIENTS if find(p) is None]
    if os.geteuid() != 0:
        raise NotRoot("the test cluster's daemons run as root")
    if missing:
        raise Unavailable(f"{', '.join(missing)} not installed: apt-get install "
                          f"{' '.join(PACKAGES)} (.ci/run does)")


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the test process dies, however it dies."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def job_steps(first: int) -> list[str]:
    """``"<job>.<step>"`` of every job step a cluster whose job ids start at ``first`` runs."""
    return [f"{job}.{step}" for job in range(first, first + JOB_IDS) for step in range(STEPS)]


def fresh_job_ids() -> int:
    """The first of ``JOB_IDS`` job ids that no MPICH shared-memory file is named for.

    MPICH names a node's shared memory after the job step under srun; a file a crashed
    run left behind makes a later step of the same name wait forever in ``MPI_Init``
    (``mpicnn.cluster.startup``). Process ids repeat (pid_max may be 32768) and test
    sessions share ``/dev/shm``, so the range is drawn at random and checked.
    """
    draw = random.SystemRandom()
    while True:
        first = JOB_IDS * draw.randrange(1, MAX_JOB_ID // JOB_IDS)
        if not mpich_step_files(job_steps(first)):
            return first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
# Test cluster on this machine (written by tests/slurm_cluster.py).
ClusterName=mpicnntest
SlurmctldHost={host}({ctld_addr})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued job (default 120 s).
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers: track processes by parent id, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
# Schedule every second, so a requeued job restarts within seconds.
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Declare more CPUs than the machine has so multi-rank jobs fit on a small runner.
SlurmdParameters=config_overrides
ReturnToService=2
# MPICH names a job step's shared memory after "<job>.<step>": job ids no leftover file
# is named for keep this cluster's steps off what other clusters' crashed jobs left.
FirstJobId={first_job_id}
JobRequeue=1
MinJobAge=3600
KillWait=5
InactiveLimit=0
MailProg=/bin/true
# Fake GPUs, so job scripts asking for --gpus-per-node run unchanged.
GresTypes=gpu
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


NODE_LINE = ("NodeName={name} NodeAddr={addr} CPUs={cpus} Gres=gpu:{gpus} RealMemory=4000 "
             "State=UNKNOWN")


class LocalSlurm:
    """Start, use and stop a private SLURM cluster under ``root``.

    ``nodes``: an emulated cluster that is up (``mpicnn.cluster.netns.Cluster``); a
    slurmd runs in each of its nodes, named by the node's hostname. Without it, one node
    on localhost. Each node declares ``cpus`` CPUs and ``gpus`` fake GPUs.
    """

    def __init__(self, root: str | os.PathLike, cpus: int = 8, gpus: int = 4, nodes=None):
        self.root = Path(root).resolve()
        self.cpus, self.gpus, self.nodes = cpus, gpus, nodes
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.first_job_id = fresh_job_ids()

    def node_addresses(self) -> dict[str, str]:
        """{node name: address} of the cluster's slurmd nodes."""
        if self.nodes is None:
            return {self.host: "127.0.0.1"}
        return {node.hostname: node.address for node in self.nodes.node_list}

    @property
    def env(self) -> dict:
        """Variables that point SLURM's client commands at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *args, timeout: float = 30, check: bool = True, env=None, cwd=None
                ) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        done = subprocess.run([find(args[0]), *map(str, args[1:])], capture_output=True,
                              text=True, timeout=timeout, cwd=cwd,
                              env={**(os.environ if env is None else env), **self.env})
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} exited {done.returncode}: "
                               f"{done.stderr.strip() or done.stdout.strip()}")
        return done

    def start(self, timeout: float = 60) -> "LocalSlurm":
        """Start the daemons (Unavailable where SLURM is not installed)."""
        check_installed()
        atexit.register(self.stop)
        for sub in ("munge", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        lines = "\n".join(NODE_LINE.format(name=name, addr=addr, cpus=self.cpus, gpus=self.gpus)
                           for name, addr in self.node_addresses().items())
        ctld_addr = "127.0.0.1" if self.nodes is None else self.nodes.bridge_address
        self.conf.write_text(SLURM_CONF.format(host=self.host, root=self.root,
                                               ctld_addr=ctld_addr, node_lines=lines,
                                               first_job_id=self.first_job_id,
                                               ctld_port=free_port(), slurmd_port=free_port()))
        self._write_gres()
        if self.nodes is not None:
            # `ip netns exec` mounts a fresh /sys for the node: cgroups are seen through
            # the machine's own root instead (slurmd will not start without them)
            version = "v1" if Path("/sys/fs/cgroup/cpu").exists() else "v2"
            (self.root / "cgroup.conf").write_text(
                f"CgroupPlugin=cgroup/{version}\n"
                f"CgroupMountpoint=/proc/1/root/sys/fs/cgroup\n")
        munge = self.root / "munge"
        self._spawn("munged", [find("munged"), "-F", "-f", f"--socket={munge}/munge.socket",
                               f"--key-file={key}", f"--pid-file={munge}/munged.pid",
                               f"--log-file={munge}/munged.log",
                               f"--seed-file={munge}/munged.seed"])
        self._wait_for(lambda: (munge / "munge.socket").exists(), timeout, "munged socket")
        self._spawn("slurmctld", [find("slurmctld"), "-D", "-i", "-f", self.conf])
        if self.nodes is None:
            self._spawn("slurmd", [find("slurmd"), "-D", "-f", self.conf])
        for node in getattr(self.nodes, "node_list", ()):
            (self.root / "spool" / node.hostname).mkdir(exist_ok=True)   # SlurmdSpoolDir
            # inside the node: its namespace, hostname and cores (the launcher wrapper)
            command = f"{find('slurmd')} -D -N {node.hostname} -f {self.conf}"
            self._spawn(f"slurmd-{node.index}", [self.nodes.wrapper, node.address, command])
        self._wait_for(self._node_ready, timeout, "nodes to become idle")
        return self

    def _write_gres(self) -> None:
        """GPUs that are /dev/null: SLURM wants device files, the jobs never open them."""
        devices = self.root / "dev"
        devices.mkdir(exist_ok=True)
        for index in range(self.gpus):
            link = devices / f"gpu{index}"
            if not link.is_symlink():
                link.symlink_to("/dev/null")
        (self.root / "gres.conf").write_text(
            f"AutoDetect=off\nName=gpu File={devices}/gpu[0-{self.gpus - 1}]\n")

    def _spawn(self, name: str, argv) -> None:
        log = open(self.root / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(list(map(str, argv)), stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL,
                                            env={**os.environ, **self.env},
                                            start_new_session=True,
                                            preexec_fn=_die_with_parent)
        log.close()

    def _node_ready(self) -> bool:
        done = self.command("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
        states = done.stdout.split()
        return (done.returncode == 0 and len(states) == len(self.node_addresses())
                and set(states) <= {"idle", "mixed", "allocated"})

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode} while waiting "
                                       f"for {what}: {self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}: "
                           f"{self.log_tail('slurmctld')} {self.log_tail('slurmd')}")

    def log_tail(self, name: str, lines: int = 5) -> str:
        text = ""
        for path in (sorted(self.root.glob(f"{name}*.log")) + [self.root / f"{name}.out"]
                     + [self.root / "munge" / f"{name}.log"]):
            if path.exists():
                text += path.read_text(errors="replace")
        return " / ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """Cancel every job, then end the daemons (slurmd first) by process id."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.command("scancel", "--full", "-u", "root", check=False, timeout=15)
        slurmds = [name for name in self.procs if name.startswith("slurmd")]
        for name in (*slurmds, "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._kill_leftover_jobs()
        for path in mpich_step_files(job_steps(self.first_job_id)):
            path.unlink(missing_ok=True)      # what this cluster's crashed jobs left

    def _kill_leftover_jobs(self) -> None:
        """SIGKILL what this cluster's jobs left behind (step daemons, scripts, ranks)."""
        for pid in list(self._job_processes()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # --- jobs ---------------------------------------------------------------------
    def sbatch(self, *args, env=None, cwd=None) -> str:
        """Submit a batch job (from ``cwd``, with environment ``env``); returns its id."""
        done = self.command("sbatch", "--parsable", *args, env=env, cwd=cwd)
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> list[dict]:
        """``scontrol show job`` records of a job (one per array task)."""
        done = self.command("scontrol", "-o", "show", "job", job_id, check=False)
        return [parse_record(line) for line in done.stdout.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float) -> list[dict]:
        """Wait until every task of ``job_id`` has finished; returns their records."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.job(job_id)
            if records and all(r.get("JobState") in FINISHED for r in records):
                return records
            time.sleep(1)
        report = self.diagnose(job_id)
        self.command("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s\n{report}")

    def wait_for(self, ready, timeout: float, what: str, job_id: str | None = None) -> None:
        """Poll ``ready()`` until it holds (for steps inside a running job)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        report = self.diagnose(job_id) if job_id else ""
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}\n{report}")

    def diagnose(self, job_id: str) -> str:
        """Where a job that did not finish stands: its record, the daemons' last log lines,
        and every process of this cluster's jobs (state, kernel wait channel, command)."""
        try:
            records = self.job(job_id)
        except subprocess.TimeoutExpired:
            records = []
        lines = [f"record: {records or 'scontrol gave none'}"]
        for out in {r["StdOut"] for r in records if r.get("StdOut")}:
            if Path(out).exists():
                tail = Path(out).read_text(errors="replace").splitlines()[-30:]
                lines.append(f"{out} (last lines):\n  " + "\n  ".join(tail))
        lines += [f"{name} log: {self.log_tail(name, 15)}" for name in ("slurmctld", "slurmd")]
        for pid in self._job_processes():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                wchan = Path(f"/proc/{pid}/wchan").read_text()
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            lines.append(f"pid {pid} state {stat[0]} wchan {wchan} cpu {stat[11]}+{stat[12]}:"
                         f" {argv.decode(errors='replace')[:200]}")
        return "\n".join(lines)

    def _job_processes(self):
        """Process ids of the processes this cluster's jobs started.

        They are found by the ``SLURM_CONF`` of this cluster in their environment, which
        slurmd passes to its step daemons and sbatch passes to the jobs.
        """
        marker = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ:
                yield int(entry.name)


@contextmanager
def running_slurm(workdir: Path, nodes=None, **start):
    """A started LocalSlurm (on ``nodes``, emulated ones, when given), stopped afterwards.

    Raises Unavailable where SLURM is not installed.
    """
    check_installed()
    cluster = LocalSlurm(workdir, nodes=nodes) if nodes is not None else LocalSlurm(workdir)
    try:
        cluster.start(**start)
        yield cluster
    finally:
        cluster.stop()


def parse_record(line: str) -> dict:
    """``Key=Value Key=Value`` (one-line scontrol output) -> dict."""
    return dict(m.groups() for m in re.finditer(r"(\w+(?::\w+)?)=(\S*)", line))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cluster = LocalSlurm(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mpicnn-slurm")
    try:
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
