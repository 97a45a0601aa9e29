"""The real federation: our methods over OpenFL 1.9's TaskRunner API with mutual TLS.

``protocol`` (wire names, lossless codec, phase schedule), ``taskrunner`` (collaborator side),
``aggregation`` (server side), ``workspace`` (plans and PKI), ``process`` (bounded start/stop).
See docs/federation.md for the design.
"""
