"""Many avatar replicas behind one address: a front that places sessions and relays signaling, and replicas
that each run the single server's engine and peer connections (docs/scale-out.md).

Only `cluster.serve_app` imports Ray; the rest runs in-process without it.
"""
