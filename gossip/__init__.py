"""The SWIM + Lifeguard membership protocol as pure state machines.

Nothing in this package reads a clock, sleeps, or touches a socket: callers
feed it ``now`` and received bytes, and collect what to send and when to call
again.  That is what lets one implementation run inside a real trio agent, in
unit tests, and in the simulator on a virtual clock.
"""
