"""
A throwaway two-node SLURM cluster on this one machine, for tests/test_slurm.py and for trying
scripts/slurm/train.sbatch by hand. No systemd, nothing under /etc touched: one directory holds the
config, the MUNGE key, state, logs and the daemons' PIDs.

    python scripts/slurm/local_cluster.py start --dir /tmp/slurm-local   # prints the SLURM_CONF export
    export SLURM_CONF=/tmp/slurm-local/slurm.conf
    sbatch --nodes=2 scripts/slurm/train.sbatch config=shakespeare_sophiag
    python scripts/slurm/local_cluster.py status --dir /tmp/slurm-local
    python scripts/slurm/local_cluster.py stop --dir /tmp/slurm-local

What runs: munged (as the munge user, its own key and socket), slurmctld, and one slurmd per emulated
node (`slurmd -N n1`, `slurmd -N n2`), all on 127.0.0.1 with distinct ports. Node names are not
resolvable host names, so scripts must take a node's address from `scontrol show node` (NodeAddr).
Needs root and the Debian packages from scripts/slurm/install_debian.sh.
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SBIN_DIRS = ["/usr/sbin", "/usr/local/sbin"]  # daemons live here; root's PATH may lack them
DAEMONS = ["munged", "slurmctld", "slurmd"]
CLIENTS = ["sbatch", "scontrol", "squeue", "scancel", "srun", "sinfo"]


def find_binary(name):
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", "")] + SBIN_DIRS))


def missing_binaries():
    """Names of the SLURM/MUNGE programs this machine lacks (empty when a cluster can start)."""
    return [name for name in DAEMONS + CLIENTS if find_binary(name) is None]


def free_ports(count):
    """`count` distinct TCP ports that nothing listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def write_config(cluster_dir, node_names, ctld_port, node_ports):
    node_cpus = os.cpu_count() or 1
    lines = [
        "ClusterName=local",
        # slurmctld only starts on a host listed here, so use this machine's own name.
        f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={node_ports[0]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={cluster_dir}/munge/munge.socket",
        f"StateSaveLocation={cluster_dir}/state",
        f"SlurmdSpoolDir={cluster_dir}/spool/%n",  # %n = node name: one spool per emulated node
        f"SlurmctldPidFile={cluster_dir}/slurmctld.pid",
        f"SlurmdPidFile={cluster_dir}/slurmd-%n.pid",
        f"SlurmctldLogFile={cluster_dir}/log/slurmctld.log",
        f"SlurmdLogFile={cluster_dir}/log/slurmd-%n.log",
        # No cgroups in a container: track job processes by their parent links, bind nothing.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        # Trust the node lines below instead of the hardware: two slurmd share one machine.
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "JobRequeue=1",
        "KillWait=10",
        "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` for 10 minutes
        "InactiveLimit=0",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=60",
    ]
    for name, port in zip(node_names, node_ports):
        lines.append(
            f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} Port={port} "
            f"CPUs={node_cpus} RealMemory=1000 State=UNKNOWN"
        )
    lines.append(f"PartitionName=debug Nodes={','.join(node_names)} Default=YES MaxTime=INFINITE State=UP")
    config_path = cluster_dir / "slurm.conf"
    config_path.write_text("\n".join(lines) + "\n")
    return config_path


def cluster_env(cluster_dir):
    env = dict(os.environ, SLURM_CONF=str(cluster_dir / "slurm.conf"))
    env["PATH"] = os.pathsep.join([env.get("PATH", "")] + SBIN_DIRS)
    return env


def read_state(cluster_dir):
    state_file = Path(cluster_dir) / "pids.json"
    return json.loads(state_file.read_text()) if state_file.exists() else {}


def is_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, parent has not reaped it yet) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def run_client(cluster_dir, *args, timeout=30):
    return subprocess.run(list(args), env=cluster_env(cluster_dir), capture_output=True, text=True,
                          timeout=timeout)


def node_states(cluster_dir):
    """{node name: state} as slurmctld sees them, e.g. {"n1": "idle", "n2": "idle"}."""
    result = run_client(cluster_dir, "sinfo", "--noheader", "--Node", "--format=%N %T")
    if result.returncode != 0:
        return {}
    return dict(line.split() for line in result.stdout.splitlines() if line.strip())


def start(cluster_dir, num_nodes=2, timeout=60):
    """Start munged, slurmctld and `num_nodes` slurmd daemons; wait until every node is idle.

    Returns the path of slurm.conf (set SLURM_CONF to it for sbatch & co). Raises RuntimeError with the
    daemons' log tails when the cluster does not come up within `timeout` seconds.
    """
    missing = missing_binaries()
    if missing:
        raise RuntimeError(f"missing SLURM/MUNGE programs {missing}: run scripts/slurm/install_debian.sh")
    if os.geteuid() != 0:
        raise RuntimeError("the local SLURM cluster runs its daemons as root and munge: run as root")
    cluster_dir = Path(cluster_dir).resolve()
    if any(is_alive(pid) for pid in read_state(cluster_dir).values()):
        raise RuntimeError(f"a cluster from {cluster_dir} is still running: local_cluster.py stop --dir {cluster_dir}")
    for parent in cluster_dir.parents:  # munged runs as the munge user and must reach its key and socket
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise RuntimeError(f"{parent} is closed to other users, so munged (user munge) cannot reach "
                               f"{cluster_dir}: use a directory under /tmp, e.g. tempfile.mkdtemp()")
    for sub in ["state", "log", "munge"] + [f"spool/n{i + 1}" for i in range(num_nodes)]:
        (cluster_dir / sub).mkdir(parents=True, exist_ok=True)
    # The traversed directories must be reachable by the munge user.
    os.chmod(cluster_dir, 0o755)

    # munged insists that the key, its socket and log directory belong to the munge user.
    munge_dir = cluster_dir / "munge"
    key_file = munge_dir / "munge.key"
    if not key_file.exists():
        key_file.write_bytes(secrets.token_bytes(1024))
    key_file.chmod(0o600)
    munge_user = "munge"
    for path in [munge_dir, key_file]:
        shutil.chown(path, user=munge_user, group=munge_user)
    munge_dir.chmod(0o755)

    node_names = [f"n{i + 1}" for i in range(num_nodes)]
    ctld_port, *node_ports = free_ports(1 + num_nodes)
    config_path = write_config(cluster_dir, node_names, ctld_port, node_ports)
    env = cluster_env(cluster_dir)

    pids = {}
    def launch(name, argv, **kwargs):
        log = open(cluster_dir / "log" / f"{name}.stdout", "ab")
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kwargs)
        pids[name] = proc.pid
        (cluster_dir / "pids.json").write_text(json.dumps(pids))  # record now, so stop() can clean up a failed start

    launch("munged", [find_binary("munged"), "--foreground", f"--socket={munge_dir}/munge.socket",
                      f"--key-file={key_file}", f"--pid-file={munge_dir}/munged.pid",
                      f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"],
           user=munge_user, group=munge_user, extra_groups=[])
    deadline = time.time() + 10
    while not (munge_dir / "munge.socket").exists() and time.time() < deadline:
        time.sleep(0.1)
    # -i: ignore the (empty) saved state, so every start is a fresh cluster; -D: stay in the foreground.
    launch("slurmctld", [find_binary("slurmctld"), "-D", "-i", "-f", str(config_path)])
    for name in node_names:
        launch(f"slurmd-{name}", [find_binary("slurmd"), "-D", "-N", name, "-f", str(config_path)])

    deadline = time.time() + timeout
    while time.time() < deadline:
        states = node_states(cluster_dir)
        if len(states) == num_nodes and all(state == "idle" for state in states.values()):
            return config_path
        dead = [name for name, pid in pids.items() if not is_alive(pid)]
        if dead:
            break
        time.sleep(0.5)
    report = describe_failure(cluster_dir)
    stop(cluster_dir)
    raise RuntimeError(f"local SLURM cluster did not come up (nodes: {node_states(cluster_dir)}):\n{report}")


def describe_failure(cluster_dir):
    lines = []
    for log in sorted((Path(cluster_dir) / "log").glob("*")) + [Path(cluster_dir) / "munge" / "munged.log"]:
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-15:]
            lines.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(lines)


def processes_of_cluster(cluster_dir):
    """PIDs of every process that carries this cluster's SLURM_CONF in its environment: the daemons we
    started, the slurmstepd processes our slurmd spawned, and the jobs' own processes (sbatch passes the
    submitter's environment on). That identifies exactly what this cluster started, nothing else."""
    marker = f"SLURM_CONF={Path(cluster_dir).resolve() / 'slurm.conf'}".encode()
    found = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        try:
            environ = (proc_dir / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(proc_dir.name))
    return found


def stop(cluster_dir, timeout=20):
    """Cancel all jobs, stop the daemons by their recorded PIDs, then end any job process left behind."""
    cluster_dir = Path(cluster_dir).resolve()
    pids = read_state(cluster_dir)
    if pids.get("slurmctld") and is_alive(pids["slurmctld"]):
        try:
            run_client(cluster_dir, "scancel", "--full", "--quiet", "--user=root", timeout=10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + timeout / 2
        while time.time() < deadline:
            try:
                queue = run_client(cluster_dir, "squeue", "--noheader", "--states=all", "--format=%T", timeout=10)
            except subprocess.TimeoutExpired:
                break
            if not any(state in queue.stdout for state in ["RUNNING", "COMPLETING", "PENDING", "CONFIGURING"]):
                break
            time.sleep(0.5)
    # slurmd before slurmctld before munged: each one still needs the next while it shuts down.
    order = sorted(pids, key=lambda name: ["slurmd", "slurmctld", "munged"].index(name.split("-")[0]))
    for name in order:
        pid = pids[name]
        if is_alive(pid):
            os.kill(pid, signal.SIGTERM)
        deadline = time.time() + timeout / 4
        while is_alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        if is_alive(pid):
            os.kill(pid, signal.SIGKILL)
    for pid in processes_of_cluster(cluster_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    (cluster_dir / "pids.json").unlink(missing_ok=True)


def status(cluster_dir):
    """{daemon name: (pid, alive)} plus the node states slurmctld reports."""
    daemons = {name: (pid, is_alive(pid)) for name, pid in read_state(cluster_dir).items()}
    return daemons, node_states(Path(cluster_dir).resolve()) if daemons else {}


def main():
    parser = argparse.ArgumentParser(description="a two-node SLURM cluster on this machine (root, Debian packages)")
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", required=True, help="directory for config, key, state, logs and PIDs")
    parser.add_argument("--nodes", type=int, default=2, help="emulated nodes (slurmd daemons), default 2")
    args = parser.parse_args()
    if args.action == "start":
        try:
            config_path = start(args.dir, args.nodes)
        except RuntimeError as error:
            sys.exit(f"error: {error}")
        print(f"cluster up: {node_states(Path(args.dir).resolve())}")
        print(f"export SLURM_CONF={config_path}")
    elif args.action == "stop":
        stop(args.dir)
        print("stopped")
    else:
        daemons, nodes = status(args.dir)
        if not daemons:
            print(f"no cluster recorded in {args.dir}")
        for name, (pid, alive) in daemons.items():
            print(f"{name:12s} pid {pid:7d} {'running' if alive else 'DEAD'}")
        for name, state in nodes.items():
            print(f"node {name}: {state}")


if __name__ == "__main__":
    main()
