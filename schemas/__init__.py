"""Record formats: raw inputs, the packed training example, the shard manifest, vocabulary layout."""
