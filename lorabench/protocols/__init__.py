"""Protocols: what an experiment does beyond training one adapter (compare, merge, continue).

An experiment names its protocol in ``protocol._target_``; the function takes (cfg, run_dir),
writes its results into run_dir and returns them (with a printable ``table``)."""
