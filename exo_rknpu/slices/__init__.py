"""Slices: the graphs a shard is cut into (embedding, groups of decoder layers, head), with static shape buckets."""
