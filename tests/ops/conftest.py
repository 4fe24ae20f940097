"""Fixtures for the observability tests: Debian's ``prometheus`` and ``prometheus-pushgateway``,
installed when missing (root and apt, by ``install_prometheus.sh``), started as our own processes
with their own data directories on free loopback ports, and stopped at the end.

The packages' system services are never used: they may not exist (no init system in a container),
they listen on every interface, and their configuration is not ours.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from ops_helpers import PromStack, free_port, prometheus_config, start_server

INSTALL = Path(__file__).with_name("install_prometheus.sh")
INSTALL_TIMEOUT_S = 300  # apt-get update + 13 small packages; a hung mirror must not hang CI
BINARIES = ("prometheus", "prometheus-pushgateway")


def _find_binaries() -> tuple[str, str] | None:
    found = [shutil.which(b) or (f"/usr/bin/{b}" if os.access(f"/usr/bin/{b}", os.X_OK) else None)
             for b in BINARIES]
    return (found[0], found[1]) if all(found) else None


@pytest.fixture(scope="session")
def prometheus_binaries() -> tuple[str, str]:
    """Paths of prometheus and prometheus-pushgateway; installs them or skips saying why."""
    found = _find_binaries()
    if found:
        return found
    proc = subprocess.Popen(["bash", str(INSTALL)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.skip(f"{' and '.join(BINARIES)} missing; {INSTALL.name} did not finish within "
                    f"{INSTALL_TIMEOUT_S}s")
    found = _find_binaries()
    if found is None:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        pytest.skip(f"{' and '.join(BINARIES)} missing and {INSTALL.name} could not install "
                    f"them: {why}")
    return found


@pytest.fixture(scope="module")
def prom_stack(prometheus_binaries: tuple[str, str],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromStack]:
    """A Pushgateway and a Prometheus that scrapes it and ``127.0.0.1:train_port`` every second."""
    prom_bin, gateway_bin = prometheus_binaries
    work = tmp_path_factory.mktemp("prometheus")
    train_port, gateway_port, prom_port = free_port(), free_port(), free_port()
    gateway = start_server("pushgateway", [gateway_bin,
                                           f"--web.listen-address=127.0.0.1:{gateway_port}"],
                           gateway_port, work)
    config = prometheus_config(work / "prometheus.yml", train_port, gateway_port)
    prom = start_server("prometheus", [prom_bin, f"--config.file={config}",
                                       f"--storage.tsdb.path={work / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{prom_port}"],
                        prom_port, work)
    try:
        gateway.wait_ready(timeout_s=30)
        prom.wait_ready(timeout_s=60)  # NOTE: 2.42 replays its (empty) WAL first: seconds
        yield PromStack(prom, gateway, train_port)
    finally:
        prom.stop()
        gateway.stop()
