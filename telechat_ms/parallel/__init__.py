"""Parallelism: the only place that knows about sharding, launch context and parallel plans.

layout.py (degrees, pipeline stage per layer, layout checks) -> strategies.py (the shard tables: training, and the
cached prefill / decode of inference) -> parallelize.py (`parallelize`: strategies, pipeline stages, recompute;
`parallelize_predict`) ; context.py / ascend.py (MindSpore context, Ascend training wrappers) ; predict_job.py (a
predict YAML's keys) + predict.py (the model-parallel stepper, sliced loading) + lockstep.py (rank 0 drives the
other ranks) ; memory.py + plan.py (`telechat-ms plan`).
"""
