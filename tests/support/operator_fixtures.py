"""Fixtures of the operator's end-to-end tests (tests/e2e/test_operator_*.py), registered by
tests/e2e/conftest.py: admin access with the MoEDeployment CRD installed and the operator's user bound
to deploy/rbac.yaml, and the operator as a process of that user. A module that needs more (the
monitoring CRDs, a namespace-scoped operator) defines its own fixture of the same name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from e2e_support import Api, Operator


@pytest.fixture(scope="module")
def api(control_plane: Any) -> Api:
    """Admin access; the MoEDeployment CRD installed, user ``operator`` bound to deploy/rbac.yaml."""
    admin = Api(control_plane.kubeconfig)
    admin.install_crd()
    admin.bind_operator_role("operator")
    return admin


@pytest.fixture(scope="module")
def operator(
    api: Api, control_plane: Any, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Operator]:
    """``python -m moe_operator`` as user ``operator``, every namespace; its log tail printed at the end."""
    workdir = tmp_path_factory.mktemp(f"operator-{request.module.__name__.rsplit('.', 1)[-1]}")
    process = Operator(workdir, control_plane.kubeconfig_for("operator"))
    process.start()
    yield process
    process.stop()
    print(process.log()[-4000:])
