#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for the `slurm` tests and for trying dpo_dist's Slurm
# launcher without a cluster:
#
#   slurm/local_cluster.sh start    install (once) and start munge, MariaDB, slurmdbd, slurmctld and
#                                   two slurmd "nodes" n1, n2 (both 127.0.0.1, different ports)
#   slurm/local_cluster.sh status   daemons and node states
#   slurm/local_cluster.sh stop     cancel every job, stop every daemon this script started
#
# Then: export SLURM_CONF=/tmp/dpo_dist_slurm/slurm.conf   (or $DPO_DIST_SLURM_DIR/slurm.conf)
#
# Everything lives under $DPO_DIST_SLURM_DIR (default /tmp/dpo_dist_slurm): configs, state, spool,
# logs, pid files and a private MariaDB data directory. Nothing is installed as a service (there is
# no systemd); daemons are started by hand and found again through their pid files. `start` is
# idempotent: it starts only what is not running. Needs root (apt-get, daemons as other users).
# Measured facts behind the settings: /work/shared/notes/local-slurm.md.
set -euo pipefail

DIR="${DPO_DIST_SLURM_DIR:-/tmp/dpo_dist_slurm}"
CONF="$DIR/slurm.conf"
RUN="$DIR/run"
LOG="$DIR/log"
DB_DIR="$DIR/mysql"
DB_RUN="$DIR/mysqld"           # socket, pid and error log of the private MariaDB (owned by mysql)
CTLD_PORT=16817
DBD_PORT=16819
DB_PORT=16306
NODE_PORTS=(17001 17002)
NODES=(n1 n2)
CPUS_PER_NODE=2                # declared, not real: SlurmdParameters=config_overrides allows it
MEM_PER_NODE_MB=8000
export SLURM_CONF="$CONF"

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------- processes

# A stopped daemon may linger as a zombie under this sandbox's init, so `kill -0` is not enough:
# a process counts as running only if /proc says it exists and is not a zombie.
alive() {
    local pid="$1"
    [[ -n "$pid" && -r "/proc/$pid/status" ]] || return 1
    ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

pid_of() { [[ -s "$1" ]] && cat "$1" || true; }

running() { alive "$(pid_of "$1")"; }

# stop_pid NAME PID: SIGTERM, wait up to 15 s, then SIGKILL.
stop_pid() {
    local name="$1" pid="$2"
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 150); do alive "$pid" || { say "stopped $name (pid $pid)"; return 0; }; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    say "killed $name (pid $pid) after 15 s"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds="$1" what="$2"; shift 2
    for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "$what did not come up within ${seconds}s (logs: $LOG, $DB_RUN)"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------------------------- install

need_install() {
    local bin
    for bin in slurmctld slurmd slurmdbd sbatch srun sacct munged mariadbd mariadb-install-db; do
        command -v "$bin" >/dev/null 2>&1 || [[ -x "/usr/sbin/$bin" ]] || return 0
    done
    return 1
}

install_packages() {
    need_install || return 0
    [[ $(id -u) -eq 0 ]] || die "Slurm is not installed and installing it needs root (apt-get)"
    say "installing slurm-wlm, munge, mariadb-server with apt-get (once)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm slurmctld slurmd slurmdbd slurm-client munge mariadb-server >/dev/null
}

# ---------------------------------------------------------------------------------- configs

write_configs() {
    mkdir -p "$DIR" "$RUN" "$LOG" "$DIR/state" "${NODES[@]/#/$DIR/spool/}"
    chmod 755 "$DIR"
    local host nodes_line=""
    host="$(hostname -s)"
    for i in "${!NODES[@]}"; do
        nodes_line+="NodeName=${NODES[$i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]} "
        nodes_line+="CPUs=$CPUS_PER_NODE RealMemory=$MEM_PER_NODE_MB State=UNKNOWN"$'\n'
    done
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: a two-node test cluster on one machine.
ClusterName=dpolocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs otherwise wait ~120 s for the old job credential to expire.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
# Several slurmd on one host, declaring more CPUs/memory than the machine has.
SlurmdParameters=config_overrides
# No cgroups in this sandbox.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MailProg=/bin/true
$nodes_line
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/slurmdbd.conf" <<EOF
# Written by slurm/local_cluster.sh.
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/slurmdbd.conf"
}

# ---------------------------------------------------------------------------------- daemons

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # already running (ours from an earlier start, or the machine's)
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 600 /etc/munge/munge.key
    chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid </dev/null >>"$LOG/munged.out" 2>&1
    cp /run/munge/munged.pid "$RUN/munged.pid"  # marks munged as started by this script
    wait_for 10 munged bash -c 'munge -n | unmunge'
    say "started munged (pid $(pid_of "$RUN/munged.pid"))"
}

start_mariadb() {
    running "$DB_RUN/mysqld.pid" && return 0
    mkdir -p "$DB_RUN"
    chown mysql:mysql "$DB_RUN"
    if [[ ! -d "$DB_DIR/mysql" ]]; then
        mkdir -p "$DB_DIR"
        chown mysql:mysql "$DB_DIR"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" \
            --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    fi
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" \
        --socket="$DB_RUN/mysqld.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$DB_RUN/mysqld.pid" --log-error="$DB_RUN/mysqld.err" --skip-log-bin \
        --innodb-buffer-pool-size=64M </dev/null >>"$LOG/mariadbd.out" 2>&1 &
    wait_for 60 MariaDB mariadb-admin --no-defaults -S "$DB_RUN/mysqld.sock" -u root ping
    mariadb --no-defaults -S "$DB_RUN/mysqld.sock" -u root -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    say "started mariadbd (pid $(pid_of "$DB_RUN/mysqld.pid"), port $DB_PORT)"
}

start_slurmdbd() {
    running "$RUN/slurmdbd.pid" && return 0
    /usr/sbin/slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1
    wait_for 30 slurmdbd port_open "$DBD_PORT"
    say "started slurmdbd (pid $(pid_of "$RUN/slurmdbd.pid"))"
}

start_slurmctld() {
    running "$RUN/slurmctld.pid" && return 0
    /usr/sbin/slurmctld </dev/null >>"$LOG/slurmctld.out" 2>&1
    wait_for 30 slurmctld bash -c 'scontrol ping | grep -q UP'
    say "started slurmctld (pid $(pid_of "$RUN/slurmctld.pid"))"
}

start_slurmd() {
    local node="$1"
    running "$RUN/slurmd-$node.pid" && return 0
    /usr/sbin/slurmd -N "$node" </dev/null >>"$LOG/slurmd-$node.out" 2>&1
    wait_for 30 "slurmd $node" running "$RUN/slurmd-$node.pid"
    say "started slurmd $node (pid $(pid_of "$RUN/slurmd-$node.pid"))"
}

nodes_ready() {
    local states
    states="$(sinfo -h -N -o '%t' 2>/dev/null)" || return 1
    [[ $(grep -cE '^(idle|mix|alloc)' <<<"$states") -eq ${#NODES[@]} ]]
}

wait_nodes() {
    for _ in $(seq 150); do
        nodes_ready && return 0
        # A node drained in an earlier run stays drained (StateSaveLocation); resume it.
        if sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(drain|down|inval|fail)'; then
            scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume >/dev/null 2>&1 || true
        fi
        sleep 0.2
    done
    sinfo -N -l >&2 || true
    die "nodes did not become idle within 30s (logs: $LOG)"
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "start needs root (daemons run as munge/mysql/root)"
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    for node in "${NODES[@]}"; do start_slurmd "$node"; done
    wait_nodes
    say "ready: export SLURM_CONF=$CONF"
}

# ---------------------------------------------------------------------------------- stop

# slurmstepd processes of this cluster carry its SLURM_CONF in their environment (inherited from
# the slurmd started here): that, not a process name, is how leftovers are recognised.
leftover_steps() {
    local p
    for p in /proc/[0-9]*; do
        [[ "$(cat "$p/comm" 2>/dev/null)" == slurmstepd ]] || continue
        tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF" && echo "${p#/proc/}"
    done
}

cancel_jobs() {
    running "$RUN/slurmctld.pid" || return 0
    local jobs
    jobs="$(squeue -h -o %A 2>/dev/null || true)"
    [[ -z "$jobs" ]] && return 0
    say "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 100); do [[ -z "$(squeue -h -o %A 2>/dev/null)" ]] && return 0; sleep 0.2; done
    say "jobs still listed after 20 s; stopping anyway"
}

cmd_stop() {
    [[ -f "$CONF" ]] || { say "nothing to stop ($CONF does not exist)"; return 0; }
    cancel_jobs
    for node in "${NODES[@]}"; do stop_pid "slurmd $node" "$(pid_of "$RUN/slurmd-$node.pid")"; done
    for pid in $(leftover_steps); do stop_pid "slurmstepd" "$pid"; done
    stop_pid slurmctld "$(pid_of "$RUN/slurmctld.pid")"
    stop_pid slurmdbd "$(pid_of "$RUN/slurmdbd.pid")"
    stop_pid mariadbd "$(pid_of "$DB_RUN/mysqld.pid")"
    if [[ -s "$RUN/munged.pid" ]]; then  # only a munged this script started
        stop_pid munged "$(pid_of "$RUN/munged.pid")"
        rm -f "$RUN/munged.pid"
    fi
    rm -f "$RUN"/slurm*.pid
}

# ---------------------------------------------------------------------------------- status

cmd_status() {  # exit 0 when every daemon runs, 3 (LSB "not running") otherwise
    local name file rc=0
    for entry in "munged:$RUN/munged.pid" "mariadbd:$DB_RUN/mysqld.pid" "slurmdbd:$RUN/slurmdbd.pid" \
                 "slurmctld:$RUN/slurmctld.pid" "slurmd n1:$RUN/slurmd-n1.pid" "slurmd n2:$RUN/slurmd-n2.pid"; do
        name="${entry%%:*}"; file="${entry#*:}"
        if running "$file"; then echo "$name: running (pid $(pid_of "$file"))"
        else echo "$name: stopped"; rc=3; fi
    done
    if running "$RUN/slurmctld.pid"; then
        echo "SLURM_CONF=$CONF"
        sinfo -N -o '%N %t %c %m %P'
    fi
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
