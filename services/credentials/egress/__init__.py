"""The egress proxy: agents' HTTP calls to allowed APIs go out with a key added on the host.

It runs in the credential service's process, on a unix socket in the agents' directory
(`<run_dir>/agent/egress.sock`), and knows a caller only by the kernel's peer credentials on that
socket (pid -> container -> the identity the container manager wrote), never by a header. Routes
(`egress.routes`) are explicit and default deny; see docs in routes.py, headers.py, usage.py.
"""
