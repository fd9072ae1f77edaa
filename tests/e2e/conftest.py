"""Fixtures of the e2e tests: the local control plane and Prometheus servers (tests/support)."""

from control_plane_fixtures import binaries, control_plane, prometheus_factory, pytest_configure

__all__ = ["binaries", "control_plane", "prometheus_factory", "pytest_configure"]
