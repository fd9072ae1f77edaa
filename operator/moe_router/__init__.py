"""Workload-aware request router: an HTTP service in front of an engine's data-parallel ranks.

It sends each OpenAI-compatible request to the rank whose node hosts the experts its prompt's domain
uses (``moe_placement.request_routing``), learns domains from the signatures engines report for
finished requests, and publishes what it learned. Imports no torch.
"""
