#!/usr/bin/env bash
# Install the SLURM and MUNGE binaries that tests/test_slurm.py needs for its two-node local cluster
# (scripts/slurm/local_cluster.py). Debian/Ubuntu, as root or with sudo. Idempotent: does nothing when
# the binaries are already there.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in sbin, which a non-root PATH may lack

needed=(slurmctld slurmd sbatch scontrol munged)
missing=0
for binary in "${needed[@]}"; do
    command -v "$binary" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 0 ]; then
    echo "slurm and munge already installed: $(slurmctld -V)"
    exit 0
fi

as_root=()
if [ "$(id -u)" != 0 ]; then
    if ! sudo -n true 2>/dev/null; then
        echo "error: installing slurm needs root: run sudo $0" >&2
        exit 1
    fi
    as_root=(sudo -n)
fi
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
# The packages' own services are not used (in containers policy-rc.d keeps them from starting):
# local_cluster.py runs its own daemons with their own config, key and socket, so nothing conflicts.
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    slurmctld slurmd slurm-client munge
