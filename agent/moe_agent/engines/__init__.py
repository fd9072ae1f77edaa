"""moeplace inside real serving engines (docs/engines.md).

The operator publishes a placement (the ``<name>-placement`` ConfigMap, mounted into the engine
pod); the engine moves its own expert weights over its own collective path and writes what it
serves to a shared directory; an engine sidecar (``python -m moe_agent.engines sidecar``) serves
that on the agent contract (``GET /v1/placement``, ``/metrics``) so the operator treats an engine
like its own agents.

* ``contract``: the files shared by the engine, the sidecar and the operator (published map, live
  status, loads) and the per-rank split of global loads.
* ``vllm_plugin``: the ``vllm.general_plugins`` entry point (EPLB policy + live/load reports).
* ``sglang_plugin``: the ``sglang.srt.plugins`` entry point (EPLB manager applies the published map).
* ``sidecar``: the HTTP side; ``standin``: a stand-in engine process for tests.

Importing any of these needs neither torch nor an engine; the plugins import them when called.
"""
