"""The moeplace Kubernetes operator: control loop, owned objects, and the local control plane."""
