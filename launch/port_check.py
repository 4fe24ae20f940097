"""Before torchrun's c10d rendezvous: may MASTER_ADDR:MASTER_PORT serve it? Not when MASTER_ADDR
does not resolve, nor on a privileged port (below 1024) that this user may not bind. Yes when
nothing listens there (the rendezvous host's agent will start the store) or a torch rendezvous
store answers (another agent of the job, on this host or the rendezvous host, started it
first); not when something else holds the port.
launch/multi_node.sh and launch/slurm.sbatch (on the first node) run it before torchrun.

    python -m launch.port_check HOST PORT    (exit 2 and one line when it cannot serve)

PORT_CHECK_TIMEOUT_S (default 3) is how long a listener there gets to answer as a store would
(and a name server that says "try again" to resolve the host).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path

# NOTE: a store answers the handshake at once (its server thread replies to the ping), over a
# cluster network too; seconds more only delay the error when something else holds the port.
TIMEOUT_S = 3.0
# NOTE: settable through the launch scripts (they pass the environment on) for the tests: each
# that holds the port with a listener that never answers waited the whole 3 s for nothing.
TIMEOUT_ENV = "PORT_CHECK_TIMEOUT_S"


def timeout_from_env() -> float:
    """``PORT_CHECK_TIMEOUT_S`` in seconds, else ``TIMEOUT_S``."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    # NOTE: float() also reads "inf", which socket.settimeout and timedelta refuse (a traceback
    # before torchrun, where this names the variable)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: give a finite number of seconds > 0, or "
                         f"unset it (default {TIMEOUT_S:g})")
    return value


def unresolvable(host: str, timeout: float = TIMEOUT_S) -> str | None:
    """Why ``host`` has no address, or None when it resolves.

    NOTE: torchrun took a MASTER_ADDR that does not resolve (a typo, a node name from another
    cluster, ``node0:29400`` with the port in it) as a host not up yet: two minutes of C++
    warnings ("cannot be retrieved (gai error: -2 ...)") and then an 88-line traceback ending
    in RendezvousConnectionError. A name server's "try again" is retried for ``timeout`` s.
    """
    end = time.monotonic() + timeout
    while True:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            return None
        except socket.gaierror as e:
            if e.errno != socket.EAI_AGAIN or time.monotonic() >= end:
                return (f"the host does not resolve ({e.strerror}): give the name or address "
                        "of the rendezvous node, one every node can resolve (the port goes in "
                        "MASTER_PORT)")
        time.sleep(0.2)


UNPRIVILEGED = "/proc/sys/net/ipv4/ip_unprivileged_port_start"  # Linux; 1024 elsewhere


def privileged(port: int) -> str | None:
    """Why this user cannot bind ``port``, a privileged one, or None when it can.

    NOTE: a port below 1024 passed this check as a non-root user (nothing listens there), and
    the rendezvous host's agent then could not start its store on it. Asked of the kernel with
    a bind, not decided from the number and the uid: CAP_NET_BIND_SERVICE (root's, or given to
    another user) and a lowered ``ip_unprivileged_port_start`` (Docker sets 0) allow it. The
    kernel checks the permission before whether the port is in use, so a port held by a store
    still answers; the socket is closed at once. Not tried above the privileged range: a bind
    there, however short, could take the port from an agent starting its store at that moment.
    Below it the same race is left open for a user who may bind there (root, or one given
    CAP_NET_BIND_SERVICE): the bind succeeds for that moment; a store whose start lands in it
    fails, and the rerun finds the port free.
    """
    try:
        start = int(Path(UNPRIVILEGED).read_text(encoding="ascii"))
    except (OSError, ValueError):
        start = 1024
    if port >= start:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", port))
    except PermissionError:
        return (f"a port below {start} is privileged and this user (uid {os.geteuid()}) may "
                "not bind it: torchrun's rendezvous store could not start there; choose one "
                f"from {start} to 65535 (e.g. 29400)")
    except OSError:  # (in use: not_a_store's question)
        pass
    return None


def not_a_store(host: str, port: int, timeout: float = TIMEOUT_S) -> str | None:
    """Why ``host:port`` cannot serve a c10d rendezvous, or None when it can (or when nothing
    answers there at all: the host may not be up yet, which torchrun waits for itself).

    NOTE: a torchrun agent that cannot start the store on the port (it is taken) connects to
    it as a store client instead (torch's c10d_rendezvous_backend._create_tcp_store), and the
    client's handshake (validate, then ping) ends in a read with no time limit (torch 2.13): a
    listener that never answers held torchrun for ever, silently; one that answered or closed
    failed it only after the 60 s read_timeout, in C++ tracebacks. Here the same client gets
    ``timeout`` seconds, in a thread, to finish its handshake.
    """
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return None  # the usual case, without importing torch: nothing listens yet
    # the client's failed attempts are logged as C++ warnings with stack traces: not here
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    from torch.distributed import TCPStore

    outcome: list[Exception | None] = []

    def connect() -> None:
        try:
            TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout))
            outcome.append(None)
        except Exception as e:  # DistNetworkError, RuntimeError: the handshake failed
            outcome.append(e)

    # NOTE: a daemon thread, as the handshake's read may never return; a process that leaves it
    # running must end with os._exit (see main).
    client = threading.Thread(target=connect, name="port-check", daemon=True)
    client.start()
    client.join(timeout)
    if outcome == [None]:
        return None
    how = (f"a store client's handshake with it failed: {outcome[0]}" if outcome else
           f"it took the connection but gave no store's answer within {timeout:g} s")
    return (f"the port is held by something that is not a torch rendezvous store ({how}); "
            "torchrun would not get past it. Choose another MASTER_PORT, or stop what listens "
            "there")


def main(argv: list[str] | None = None) -> int:
    """0 when torchrun may use the port; otherwise the reason, and the process ends (2)."""
    ap = argparse.ArgumentParser(prog="launch.port_check", description=__doc__.split("\n")[0])
    ap.add_argument("host", help="MASTER_ADDR, the rendezvous host")
    ap.add_argument("port", help="MASTER_PORT, its port (1 to 65535)")
    args = ap.parse_args(argv)
    # NOTE: slurm.sbatch takes MASTER_PORT as given (multi_node.sh checks it itself): 70000
    # passed this check (getaddrinfo's error read as "nothing listens") and reached torchrun
    if not (args.port.isdigit() and 1 <= int(args.port) <= 65535):
        print(f"error: MASTER_PORT={args.port}: give a whole number from 1 to 65535",
              file=sys.stderr)
        return 2
    args.port = int(args.port)
    try:
        timeout = timeout_from_env()
    except ValueError as e:
        ap.error(str(e))
    why = unresolvable(args.host, timeout)
    if why is not None:
        print(f"error: MASTER_ADDR={args.host}: {why}", file=sys.stderr)
        return 2
    why = privileged(args.port)
    if why is not None:
        print(f"error: MASTER_PORT={args.port}: {why}", file=sys.stderr)
        return 2
    why = not_a_store(args.host, args.port, timeout)
    if why is None:
        return 0
    print(f"error: MASTER_ADDR:MASTER_PORT={args.host}:{args.port}: {why}", file=sys.stderr,
          flush=True)
    # NOTE: not a plain exit: the handshake thread, still inside torch's C++ client while the
    # interpreter shut down, aborted the process ("terminate called without an active
    # exception", exit 134) when its retries ended.
    os._exit(2)


if __name__ == "__main__":
    sys.exit(main())
