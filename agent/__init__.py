"""The agent process: config, sockets, the trio nursery that drives gossip, the local API."""
