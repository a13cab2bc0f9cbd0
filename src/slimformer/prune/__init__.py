"""UPop-style structured pruning and physical slicing: filled by the prune issue."""
