"""HTCondor configuration files and submit-language quoting, as pure functions (easy to test, easy to read).

Every daemon of a CE's pool reads one file written here. The pool is closed: every
command, reads included, must authenticate with the PASSWORD method, whose pool
password is derived from the grid key, so a host without the key cannot even list
the pool, let alone add a startd to it.
"""

from __future__ import annotations

from pathlib import Path

POOL_IDENTITY = "condor_pool@*"
UID_DOMAIN = "bonjourgrid"
# Who submits: the daemons' own (unprivileged) user, authenticated with a token signed by the pool key.
SUBMITTER = f"bonjourgrid@{UID_DOMAIN}"
# Fast cycles: a CE is small and short-lived, the defaults (minutes) are tuned for big pools.
FAST = """\
UPDATE_INTERVAL = 2
UPDATE_OFFSET = 0
NEGOTIATOR_INTERVAL = 2
NEGOTIATOR_MIN_INTERVAL = 1
NEGOTIATOR_CYCLE_DELAY = 1
SCHEDD_INTERVAL = 2
SCHEDD_MIN_INTERVAL = 1
STARTER_UPDATE_INTERVAL = 2
SHADOW_QUEUE_UPDATE_INTERVAL = 2
MASTER_UPDATE_INTERVAL = 5
"""

# What a chroot (and no cgroup delegation) needs: verified with trixie's condor 23.9.6.
SANDBOXING = """\
MOUNT_UNDER_SCRATCH =
BASE_CGROUP =
USE_PID_NAMESPACES = False
CGROUP_MEMORY_LIMIT_POLICY = none
"""

# The node's owner policy, seen by the startd as the machine attribute BgOwnerBusy: the worker half
# rewrites owner.config and sends the startd a reconfig when the owner's state flips. Busy owner: no
# new job starts, running ones are suspended, resumed when the owner leaves, and given back
# (vacated, to run elsewhere) after BgMaxSuspendTime.
POLICY = """\
BgOwnerBusy = False
include ifexist : $(LOCAL_DIR)/owner.config
STARTD_ATTRS = $(STARTD_ATTRS) BgOwnerBusy
BgMaxSuspendTime = 600
START = (BgOwnerBusy =!= True)
SUSPEND = (BgOwnerBusy =?= True)
CONTINUE = (BgOwnerBusy =!= True)
WANT_SUSPEND = True
PREEMPT = (Activity == "Suspended") && ($(ActivityTimer) > $(BgMaxSuspendTime))
KILL = False
WANT_VACATE = True
"""


def security(password_dir: Path) -> str:
    """Authenticated, encrypted, integrity-checked everything; only the pool identity is allowed anything."""
    allow = "\n".join(f"ALLOW_{p} = {POOL_IDENTITY} {SUBMITTER}" for p in (
        "READ", "WRITE", "DAEMON", "NEGOTIATOR", "ADMINISTRATOR", "ADVERTISE_STARTD", "ADVERTISE_SCHEDD",
        "ADVERTISE_MASTER", "CONFIG", "OWNER"))
    return f"""\
SEC_DEFAULT_AUTHENTICATION = REQUIRED
SEC_USE_FAMILY_SESSION = False
SEC_DEFAULT_ENCRYPTION = REQUIRED
SEC_DEFAULT_INTEGRITY = REQUIRED
SEC_DEFAULT_AUTHENTICATION_METHODS = PASSWORD, IDTOKENS
SEC_CLIENT_AUTHENTICATION_METHODS = PASSWORD, IDTOKENS
TRUST_DOMAIN = {UID_DOMAIN}
SEC_PASSWORD_DIRECTORY = {password_dir}
SEC_PASSWORD_FILE = {password_dir}/POOL
SEC_TOKEN_POOL_SIGNING_KEY_FILE = {password_dir}/POOL
{allow}
DENY_READ =
DENY_WRITE =
"""


def common(local_dir: Path, collector: str, address: str, port: int) -> str:
    return f"""\
# Written by bonjourgrid-condor: one computing element's pool. Do not edit; removed at job end.
# The installation's own file for where binaries live (LIBEXEC differs between distributions), and
# none of its local settings: everything else is ours.
include ifexist : /etc/condor/condor_config
LOCAL_CONFIG_FILE =
LOCAL_CONFIG_DIR =
NO_DNS = True
DEFAULT_DOMAIN_NAME = bonjourgrid
LOCAL_DIR = {local_dir}
LOG = $(LOCAL_DIR)/log
SPOOL = $(LOCAL_DIR)/spool
EXECUTE = $(LOCAL_DIR)/execute
LOCK = $(LOCAL_DIR)/lock
RUN = $(LOCAL_DIR)/run
CONDOR_HOST = {collector.rsplit(":", 1)[0]}
COLLECTOR_HOST = {collector}
NETWORK_INTERFACE = {address}
BIND_ALL_INTERFACES = False
USE_SHARED_PORT = True
SHARED_PORT_PORT = {port}
UID_DOMAIN = {UID_DOMAIN}
TRUST_UID_DOMAIN = True
SOFT_UID_DOMAIN = True
FILESYSTEM_DOMAIN = $(FULL_HOSTNAME)
CONDOR_ADMIN =
MAIL = /bin/true
ENABLE_KERNEL_TUNING = False
"""


def coordinator_config(local_dir: Path, address: str, port: int, password_dir: Path) -> str:
    collector = f"{address}:{port}"
    return (common(local_dir, collector, address, port) + security(password_dir) + FAST + SANDBOXING + f"""\
DAEMON_LIST = MASTER COLLECTOR NEGOTIATOR SCHEDD
COLLECTOR_NAME = bonjourgrid
COLLECTOR_HOST = {collector}
NEGOTIATOR_DEPTH_FIRST = True
# No RESCHEDULE after a submit (the 2 s negotiation cycle comes anyway): sent while the negotiator is
# busy negotiating with this schedd, its blocking authentication stalled both for 20 s.
SCHEDD_SEND_RESCHEDULE = False
SCHEDD_ASSUME_NEGOTIATOR_GONE = 10
""")


def worker_config(local_dir: Path, collector: str, address: str, port: int, password_dir: Path, *,
                  cpus: int, memory_mib: int, node_id: str) -> str:
    return (common(local_dir, collector, address, port) + security(password_dir) + FAST + SANDBOXING + POLICY
            + f"""\
DAEMON_LIST = MASTER STARTD
NUM_CPUS = {cpus}
MEMORY = {memory_mib}
use FEATURE : PartitionableSlot
BgNode = "{node_id}"
STARTD_ATTRS = $(STARTD_ATTRS) BgNode
STARTD_NOCLAIM_SHUTDOWN = 0
RunBenchmarks = False
""")


def client_config(collector: str, password_dir: Path, token_dir: Path) -> str:
    """What the bindings in the node daemon read: they authenticate with the submitter's token first."""
    return f"""\
SEC_TOKEN_DIRECTORY = {token_dir}
COLLECTOR_HOST = {collector}
NO_DNS = True
DEFAULT_DOMAIN_NAME = bonjourgrid
UID_DOMAIN = {UID_DOMAIN}
{security(password_dir)}SEC_CLIENT_AUTHENTICATION_METHODS = IDTOKENS
"""


def owner_config(busy: bool) -> str:
    return f"BgOwnerBusy = {'True' if busy else 'False'}\n"


def quote_args(argv: list[str] | tuple[str, ...]) -> str:
    """argv in Condor's new argument syntax: the whole in double quotes, each argument in single quotes."""
    out = []
    for a in argv:
        a = a.replace('"', '""').replace("'", "''")
        out.append(f"'{a}'")
    return '"' + " ".join(out) + '"'


def quote_env(env: dict[str, str]) -> str:
    """An environment in Condor's new syntax (double-quoted, values single-quoted)."""
    items = []
    for k, v in env.items():
        if not k or "=" in k or any(c.isspace() for c in k):
            raise ValueError(f"bad environment variable name {k!r}")
        v = v.replace('"', '""').replace("'", "''")
        items.append(f"{k}='{v}'")
    return '"' + " ".join(items) + '"'
