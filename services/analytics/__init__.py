"""Analytics service: per-adapter aggregates in Redis and mergeable latency sketches."""
