"""Fixtures of the e2e tests: the local control plane and Prometheus servers (tests/support), admin
access to the API server and the operator process (one of each per test module)."""

from collections.abc import Iterator

import pytest

from control_plane_fixtures import binaries, control_plane, prometheus_factory, pytest_configure
from e2e_support import Api, Operator

__all__ = ["api", "binaries", "control_plane", "operator", "prometheus_factory", "pytest_configure"]


@pytest.fixture(scope="module")
def api(control_plane) -> Api:
    """Admin access, the MoEDeployment CRD installed, the ``operator`` user bound to deploy/rbac.yaml."""
    admin = Api(control_plane.kubeconfig)
    admin.install_crd()
    admin.bind_operator_role("operator")
    return admin


@pytest.fixture(scope="module")
def operator(api, control_plane, tmp_path_factory) -> Iterator[Operator]:
    """``python -m moe_operator`` as the ``operator`` user, watching every namespace; its log's tail is
    printed at teardown."""
    process = Operator(tmp_path_factory.mktemp("operator"), control_plane.kubeconfig_for("operator"))
    process.start()
    yield process
    process.stop()
    print(process.log()[-4000:])
