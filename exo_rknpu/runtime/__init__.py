"""Runtime: runs a shard's slices on backends, owns per-request KV caches, samples."""
