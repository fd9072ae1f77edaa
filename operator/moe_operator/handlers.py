"""kopf handlers: thin wrappers around ``moe_operator.control.Controller``.

* create / resume / spec update -> ``Controller.reconcile`` (owned objects, initial placement);
  an invalid spec marks the resource ``Invalid`` and is a ``kopf.PermanentError``; anything that
  should be retried later is a ``kopf.TemporaryError``.
* one daemon per resource -> ``Controller.cycle`` every ``spec.placement.rebalanceIntervalSeconds``
  (sooner while the resource waits for its placement or its agents). A running migration stops at
  the next stage boundary when the spec changes, rebalancing is paused, or the operator stops.

Run with ``moeplace operator`` / ``python -m moe_operator`` (or ``kopf run -m moe_operator.handlers``).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import kopf

from moe_operator.control import Controller, Retry
from moe_operator.crd import GROUP, PLURAL, VERSION, SpecError
from moe_operator.kube import Kube, load_config
from moe_operator.outcomes import WAIT_INTERVAL_S
from moe_operator.solver import warm_up

logger = logging.getLogger("moe_operator")
RUNTIME: dict[str, Any] = {}


def _event(body: Any, kind: str, reason: str, message: str) -> None:
    try:
        kopf.event(body, type=kind, reason=reason, message=message[:1000])
    except Exception as error:  # noqa: BLE001 - events are best effort
        logger.debug("event %s not posted: %s", reason, error)


def controller() -> Controller:
    return RUNTIME["controller"]


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = logging.WARNING
    # No cluster-wide watch of CRDs and namespaces: deploy/rbac.yaml does not grant it. The CRD must
    # exist before the operator starts (the chart installs crds/ first).
    settings.scanning.disabled = True
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.execution.max_workers = 32
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="moeplace-io"))
    workers = int(os.environ.get("MOEPLACE_SOLVER_WORKERS", "1"))

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    pool = None
    if workers > 0:
        pool = new_pool()
        await loop.run_in_executor(pool, warm_up)
    kube = Kube(await asyncio.to_thread(load_config, os.environ.get("KUBECONFIG") or None))
    RUNTIME["controller"] = Controller(kube, pool=pool, event=_event, pool_factory=new_pool if pool else None)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    ctl = RUNTIME.pop("controller", None)
    if ctl is not None:
        await ctl.close()
        if ctl.pool is not None:
            ctl.pool.shutdown(wait=False, cancel_futures=True)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile(body: kopf.Body, **_: Any) -> None:
    try:
        await controller().reconcile(dict(body))
    except SpecError as error:
        raise kopf.PermanentError(str(error)) from None
    except Retry as error:
        raise kopf.TemporaryError(str(error), delay=error.delay) from None


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=120.0)
async def rebalance(
    name: str, namespace: str, body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    ctl = controller()
    while not stopped:
        generation = body.get("metadata", {}).get("generation")

        def should_stop() -> bool:
            spec = body.get("spec") or {}
            return (
                bool(stopped)
                or body.get("metadata", {}).get("generation") != generation
                or bool((spec.get("placement") or {}).get("paused"))
            )

        interval = float(((body.get("spec") or {}).get("placement") or {}).get("rebalanceIntervalSeconds", 300))
        try:
            outcome = await ctl.cycle(namespace, name, should_stop)
        except Exception:  # noqa: BLE001 - a bad cycle must not end the daemon
            logger.exception("%s/%s: rebalance cycle failed", namespace, name)
            await stopped.wait(min(interval, WAIT_INTERVAL_S))
            continue
        logger.info("%s/%s: cycle: %s %s", namespace, name, outcome.result, outcome.message[:200])
        if outcome.retry_after is not None:
            interval = min(interval, outcome.retry_after)
        await stopped.wait(interval)
    if stopped.reason and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED:
        ctl.forget(namespace, name)
