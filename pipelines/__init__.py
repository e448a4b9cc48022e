"""Data-side functions: corpus reading, sketch extraction, encoding, bucketing (Ray Data jobs call these)."""
