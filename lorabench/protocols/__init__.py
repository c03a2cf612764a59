"""Protocols: what an experiment does beyond training one adapter (compare, merge, continue).

An experiment names its protocol in ``protocol._target_``; the function takes (cfg, run_dir),
writes its results into run_dir and returns them (with a printable ``table``).

One file per paper: :mod:`~lorabench.protocols.orthogonal_adaptation` (Table 2),
:mod:`~lorabench.protocols.continual` (the continual tables), :mod:`~lorabench.protocols.trilora`
(Table 1); beside them :mod:`~lorabench.protocols.single_concept`, :mod:`~lorabench.protocols.single_style`
and the merge job :mod:`~lorabench.protocols.merge_adapters`. What they share: :mod:`~lorabench.protocols.cells`
(training cells and their cache), :mod:`~lorabench.protocols.scoring` (the eval setup),
:mod:`~lorabench.protocols.report` (summaries, tables, outputs, the rebuild command) and
:mod:`~lorabench.protocols.resume` (resumable sequences).
"""
