"""Operator-wide settings: the command-line flags that shape every object and call the operator makes.

``moeplace operator`` parses its flags into one ``OperatorSettings`` and installs it with
``configure()`` before kopf starts; builders, agent discovery and the Prometheus client read it with
``current()``. Without ``configure()`` (unit tests, library use) the defaults apply: no inherited
labels, the repository's runbooks, no agent-host override, certificate verification on.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moe_placement.models import format_validation_error

DEFAULT_RUNBOOK_BASE_URL = "https://github.com/moeplace/moeplace/blob/main/docs/runbooks/"
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SERVICE_ACCOUNT_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

_LABEL_KEY_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"


class PrometheusAuth(BaseModel):
    """How the operator authenticates Prometheus and is authenticated by it.

    ``ca_file``: PEM bundle the server certificate must chain to (default: the system's CAs);
    ``insecure_skip_verify``: accept any certificate (never the default); ``bearer_token_file``: sent
    as ``Authorization: Bearer``, re-read on every query (projected service-account tokens rotate).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_file: str | None = None
    insecure_skip_verify: bool = False
    bearer_token_file: str | None = None

    def verify(self) -> bool | str:
        """``requests``' ``verify``: the CA file, or True (system CAs), or False (skip)."""
        if self.insecure_skip_verify:
            return False
        return self.ca_file or True

    def headers(self) -> dict[str, str]:
        """The Authorization header, read from ``bearer_token_file`` now (empty without one)."""
        if not self.bearer_token_file:
            return {}
        with open(self.bearer_token_file) as handle:
            token = handle.read().strip()
        if not token:
            raise ValueError(f"--prometheus-bearer-token-file: {self.bearer_token_file} is empty")
        return {"Authorization": f"Bearer {token}"}


class OperatorSettings(BaseModel):
    """Operator-wide flags (``moeplace operator --help`` documents each)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inherited_labels: dict[str, str] = Field(default_factory=dict)
    runbook_base_url: str = DEFAULT_RUNBOOK_BASE_URL
    agent_host_override: bool = False
    prometheus_url: str | None = None
    prometheus: PrometheusAuth = Field(default_factory=PrometheusAuth)

    def prometheus_auth(self, url: str) -> PrometheusAuth:
        """The TLS and authentication settings for queries to ``url``. The bearer token goes only to
        the operator's own Prometheus (``--prometheus-url``'s scheme, host and port): a MoEDeployment's
        ``spec.metrics.prometheusUrl`` is chosen by its author and must not receive the operator's
        credentials."""
        if self.prometheus.bearer_token_file and _origin(url) != _origin(self.prometheus_url or ""):
            return self.prometheus.model_copy(update={"bearer_token_file": None})
        return self.prometheus

    @field_validator("inherited_labels")
    @classmethod
    def _label_keys(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            prefix, _, name = key.rpartition("/")
            if not re.fullmatch(_LABEL_KEY_PART, name) or (prefix and not re.fullmatch(r"[a-z0-9.-]{1,253}", prefix)):
                raise ValueError(f"label key {key!r} is not a valid Kubernetes label key")
            if value and not re.fullmatch(_LABEL_KEY_PART, value):
                raise ValueError(f"label {key}={value!r}: the value is not a valid Kubernetes label value")
            if key.startswith(("moeplace.io/", "app.kubernetes.io/")):
                raise ValueError(f"label key {key!r}: moeplace.io/ and app.kubernetes.io/ labels are the operator's own")
        return labels

    @field_validator("runbook_base_url")
    @classmethod
    def _runbook_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url if url.endswith("/") else url + "/"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port or default_port
    except ValueError:
        port = None
    return parts.scheme, (parts.hostname or "").lower(), port


def parse_label_pairs(pairs: list[str]) -> dict[str, str]:
    """``["release=kps", "team=ml"]`` -> ``{"release": "kps", "team": "ml"}``; ValueError names the bad pair."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--inherited-label {pair!r}: expected key=value")
        labels[key] = value
    return labels


def build_settings(**fields: object) -> OperatorSettings:
    """``OperatorSettings`` from flag values; ValueError names the flag's field."""
    try:
        return OperatorSettings.model_validate(fields)
    except ValidationError as error:
        raise ValueError(format_validation_error(error, prefix="operator")) from None


_current = OperatorSettings()


def configure(settings: OperatorSettings) -> OperatorSettings:
    """Install ``settings`` for the whole process; returns the previous ones (tests restore them)."""
    global _current
    previous, _current = _current, settings
    return previous


def current() -> OperatorSettings:
    return _current
