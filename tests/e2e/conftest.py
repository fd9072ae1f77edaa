"""Fixtures of the e2e tests: the local control plane and Prometheus servers, and the operator's
admin access and process (tests/support)."""

from control_plane_fixtures import binaries, control_plane, prometheus_factory, pytest_configure
from operator_fixtures import api, operator

__all__ = ["api", "binaries", "control_plane", "operator", "prometheus_factory", "pytest_configure"]
