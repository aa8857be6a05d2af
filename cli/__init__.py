"""The ``mesh-agent`` command line: a thin click front over the local API."""
