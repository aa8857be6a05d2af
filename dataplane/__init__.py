"""The data plane: it owns the bytes that travel between services.

Noise handshakes authenticate agents to one another, encrypted tunnels carry
service traffic over the resulting keys, and proxies splice local connections
into those tunnels.  The data plane never writes membership or the service
registry; it reads them through a small read-only interface, so that the
gossip layer stays the single source of truth about who is in the mesh and the
data plane only decides whether a peer it is talking to belongs there.
"""
