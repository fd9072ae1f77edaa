"""Session fixtures of the tests that need a real kube-apiserver + etcd and real Prometheus servers on
loopback (tests/e2e, tests/chart): each conftest imports them, so each directory starts its own.

When the binaries cannot be installed or built, e2e tests fail loudly under CI (where a skip would hide
a broken environment) and are skipped with the reason elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from moeplace_dev.cluster import (
    Binaries,
    ClusterError,
    LocalCluster,
    PrometheusServer,
    ensure_binaries,
    start_control_plane,
    start_prometheus,
)

PrometheusFactory = Callable[..., PrometheusServer]


def pytest_configure(config: pytest.Config) -> None:
    # The local apiserver's certificate is self-signed and only reachable on 127.0.0.1; the kubernetes
    # client would otherwise warn on every request.
    config.addinivalue_line("filterwarnings", "ignore::urllib3.exceptions.InsecureRequestWarning")


@pytest.fixture(scope="session")
def binaries() -> Binaries:
    """etcd, kube-apiserver and Prometheus, installed and built on first use."""
    try:
        return ensure_binaries()
    except ClusterError as error:
        reason = f"local control plane binaries unavailable: {error}"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def control_plane(binaries: Binaries, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """kube-apiserver + etcd for the whole session; static users ``admin``, ``operator``, ``nobody``."""
    with start_control_plane(tmp_path_factory.mktemp("control-plane")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def prometheus_factory(
    binaries: Binaries, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusFactory]:
    """``factory(targets, scrape_interval="1s", labels=None)`` starts a Prometheus; all stop at teardown."""
    started: list[PrometheusServer] = []

    def factory(
        targets: Sequence[str] | Path = (),
        scrape_interval: str = "1s",
        labels: Mapping[str, str] | None = None,
    ) -> PrometheusServer:
        server = start_prometheus(
            tmp_path_factory.mktemp("prometheus"), targets, scrape_interval, labels=labels
        )
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
