"""Pure pieces of the local control plane: kubeconfig, token file, Prometheus config, flags, ports."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from moeplace_dev.cluster import (
    PROMETHEUS_JOB,
    ClusterError,
    build_kubeconfig,
    build_prometheus_config,
    build_target_groups,
    cluster_env_lines,
    ensure_binaries,
    free_port,
    parse_flag,
    render_token_file,
    start_control_plane,
    start_prometheus,
    write_targets_file,
)


def test_kubeconfig_uses_token_and_skips_tls_verification() -> None:
    config = build_kubeconfig("https://127.0.0.1:6443", "operator", "s3cret")
    assert config["current-context"] == "operator@moeplace-local"
    (cluster,) = config["clusters"]
    assert cluster["cluster"] == {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}
    assert config["users"] == [{"name": "operator", "user": {"token": "s3cret"}}]
    (context,) = config["contexts"]
    assert context["context"] == {"cluster": "moeplace-local", "user": "operator"}


def test_kubeconfig_loads_in_the_kubernetes_client(tmp_path: Path) -> None:
    from kubernetes import client, config

    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(build_kubeconfig("https://127.0.0.1:6443", "admin", "tok")))
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=configuration)
    assert configuration.host == "https://127.0.0.1:6443"
    assert configuration.verify_ssl is False
    assert configuration.api_key["BearerToken"] == "Bearer tok"


@pytest.mark.parametrize(
    ("server", "user", "token", "problem"),
    [
        ("http://127.0.0.1:6443", "admin", "tok", "https://"),
        ("https://127.0.0.1:6443", "", "tok", "user name"),
        ("https://127.0.0.1:6443", "admin", "", "token"),
    ],
)
def test_kubeconfig_rejects_bad_input(server: str, user: str, token: str, problem: str) -> None:
    with pytest.raises(ClusterError, match=problem):
        build_kubeconfig(server, user, token)


def test_token_file_quotes_groups_and_omits_empty_ones() -> None:
    text = render_token_file(
        {"admin": ("system:masters",), "ops": ("a", "b"), "nobody": ()},
        {"admin": "t1", "ops": "t2", "nobody": "t3"},
    )
    assert text.splitlines() == ['t1,admin,admin,"system:masters"', 't2,ops,ops,"a,b"', "t3,nobody,nobody"]


@pytest.mark.parametrize("name", ["a,b", 'say "hi"', "two\nlines", ""])
def test_token_file_rejects_names_that_would_corrupt_it(name: str) -> None:
    with pytest.raises(ClusterError, match="user or group name"):
        render_token_file({name: ()}, {name: "t"})


def test_prometheus_config_reads_targets_from_file_sd(tmp_path: Path) -> None:
    targets = tmp_path / "targets.json"
    config = build_prometheus_config(targets, "2s")
    assert config["global"]["scrape_interval"] == "2s"
    (job,) = config["scrape_configs"]
    assert job["job_name"] == PROMETHEUS_JOB
    assert job["scrape_interval"] == "2s"
    assert job["file_sd_configs"][0]["files"] == [str(targets)]
    # It must survive a YAML round trip unchanged: it is written as prometheus.yml.
    assert yaml.safe_load(yaml.safe_dump(config)) == config


@pytest.mark.parametrize("interval", ["1", "1 s", "0s", "fast", "1.5s", "-1s"])
def test_prometheus_config_rejects_bad_intervals(tmp_path: Path, interval: str) -> None:
    with pytest.raises(ClusterError, match="scrape_interval"):
        build_prometheus_config(tmp_path / "t.json", interval)


def test_target_groups_carry_labels() -> None:
    groups = build_target_groups(["127.0.0.1:9100", "localhost:8000"], {"pod": "agent-0"})
    assert groups == [{"targets": ["127.0.0.1:9100", "localhost:8000"], "labels": {"pod": "agent-0"}}]
    assert build_target_groups([]) == []


@pytest.mark.parametrize(
    ("targets", "labels", "problem"),
    [
        ("127.0.0.1:9100", None, "list of 'host:port'"),
        (["http://127.0.0.1:9100"], None, "not 'host:port'"),
        (["127.0.0.1"], None, "not 'host:port'"),
        (["127.0.0.1:0"], None, "not 'host:port'"),
        (["127.0.0.1:70000"], None, "not 'host:port'"),
        (["127.0.0.1:9100/metrics"], None, "not 'host:port'"),
        (["127.0.0.1:9100"], {"1bad": "x"}, "label name"),
        (["127.0.0.1:9100"], {"__address__": "x"}, "label name"),
        (["127.0.0.1:9100"], {"pod": 3}, "string value"),
    ],
)
def test_target_groups_reject_bad_input(targets: object, labels: object, problem: str) -> None:
    with pytest.raises(ClusterError, match=problem):
        build_target_groups(targets, labels)  # type: ignore[arg-type]


def test_targets_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "sd" / "targets.json"
    write_targets_file(path, ["127.0.0.1:1"])
    write_targets_file(path, ["127.0.0.1:2"], {"a": "b"})
    assert json.loads(path.read_text()) == [{"targets": ["127.0.0.1:2"], "labels": {"a": "b"}}]
    assert [p.name for p in path.parent.iterdir()] == ["targets.json"]


@pytest.mark.parametrize(
    ("value", "expected"), [(None, False), ("", False), ("0", False), ("1", True), ("Yes", True)]
)
def test_parse_flag(value: str | None, expected: bool) -> None:
    assert parse_flag(value, "X") is expected


def test_parse_flag_names_the_variable_on_bad_input() -> None:
    with pytest.raises(ClusterError, match="MOEPLACE_USE_EXISTING_KUBECONFIG='maybe'"):
        parse_flag("maybe", "MOEPLACE_USE_EXISTING_KUBECONFIG")


def test_env_lines_are_shell_quoted() -> None:
    state = {
        "kubeconfig": "/tmp/with space/kubeconfig",
        "prometheus": {"url": "http://127.0.0.1:9090", "targets_file": "/tmp/t.json"},
    }
    assert cluster_env_lines(state) == [
        "export KUBECONFIG='/tmp/with space/kubeconfig'",
        "export MOEPLACE_PROMETHEUS_URL=http://127.0.0.1:9090",
        "export MOEPLACE_PROMETHEUS_TARGETS_FILE=/tmp/t.json",
    ]


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_binary_override_that_does_not_exist_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEPLACE_ETCD", "/nonexistent/etcd")
    with pytest.raises(ClusterError, match="MOEPLACE_ETCD='/nonexistent/etcd'"):
        ensure_binaries()


def test_file_sd_path_must_have_an_extension_prometheus_reads(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match=r"must end in \.json"):
        start_prometheus(tmp_path, tmp_path / "targets.txt")


@pytest.mark.parametrize(("users", "problem"), [({"admin": ()}, "reserved"), ({"a,b": ()}, "user or group")])
def test_control_plane_rejects_bad_users_before_starting_anything(
    tmp_path: Path, users: dict[str, tuple[str, ...]], problem: str
) -> None:
    with pytest.raises(ClusterError, match=problem):
        start_control_plane(tmp_path, users=users)
    assert list(tmp_path.iterdir()) == []
