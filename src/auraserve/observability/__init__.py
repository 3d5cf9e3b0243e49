"""Metrics and logs: what an operator sees of a running process.

It sits low in the layers (below `store`, above `core`) because the store's transition hooks,
the worker, the webhook sender and the API all emit metrics; it imports nothing of ours but
`core` and `errors`. What needs the store (queue depth, live workers) is sampled by a callable
the caller hands to `metrics.StoreCollector`, so this package never queries anything itself.
"""
