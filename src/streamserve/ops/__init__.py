"""Operator tools behind the CLI and the demo: preflight checks, topics and ACLs, schema checks, bulk loading.

The worker never imports them; they may import everything below the entry points except wiring and app.
"""
