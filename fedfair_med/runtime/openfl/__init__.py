"""The real federation: our methods over OpenFL 1.9's TaskRunner API with mutual TLS.

``wire`` (names on the wire, lossless codec, packing), ``schedule`` (which tasks run in which
OpenFL round), ``spec`` (what the plan fixes for everyone), ``timing`` (per-phase seconds),
``taskrunner`` (collaborator side), ``aggregation`` (server side), ``secure`` (secure
aggregation), ``workspace`` (plans and PKI), ``process`` (bounded start/stop).
See docs/federation.md for the design.
"""
