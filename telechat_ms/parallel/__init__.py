"""Parallelism: the only place that knows about sharding, launch context and parallel plans.

layout.py (degrees, pipeline stage per layer, layout checks) -> strategies.py (the shard table) ->
parallelize.py (`parallelize(model, job)`: strategies, pipeline stages, recompute) ; context.py / ascend.py
(MindSpore context, Ascend training wrappers) ; memory.py + plan.py + cli.py (`telechat-ms plan`).
"""
