"""Parallelism: the only place that knows about sharding, launch context and parallel plans."""
