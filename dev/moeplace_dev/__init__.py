"""The local dev stack of a moeplace git checkout: a loopback control plane (etcd, kube-apiserver,
Prometheus), replay agents and the operator as processes, and ``moeplace demo``.

It reads the checkout (``scripts/system-deps.sh``, ``deploy/rbac.yaml``, ``examples/``), so it is a
distribution of its own (``dev/pyproject.toml``) that ``make setup`` installs next to ``moeplace`` and
the operator image leaves out. It imports the operator's packages; they never import it.
"""
