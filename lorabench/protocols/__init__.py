"""Protocols: what an experiment does beyond training one adapter (compare, merge, continue).

An experiment names its protocol in ``protocol._target_``; the function takes (cfg, run_dir),
writes its results into run_dir and returns them (with a printable ``table``).

One file per paper: :mod:`~lorabench.protocols.orthogonal_adaptation` (Table 2),
:mod:`~lorabench.protocols.continual` (the continual tables), :mod:`~lorabench.protocols.trilora`
(Table 1); beside them :mod:`~lorabench.protocols.single_concept`, :mod:`~lorabench.protocols.single_style`,
the sample job :mod:`~lorabench.protocols.sample` and the merge job :mod:`~lorabench.protocols.merge_adapters`.
What they share: :mod:`~lorabench.protocols.base` (the contract: settings, table columns, verdicts, the
registry of papers and their rebuild command, ``python -m lorabench.protocols rebuild <paper> RUNS...``),
:mod:`~lorabench.protocols.cells` (cells and the one runner that trains them), :mod:`~lorabench.protocols.scoring`
(the eval setup), :mod:`~lorabench.protocols.report` (a run's session and outputs),
:mod:`~lorabench.protocols.sequence` (a continual task sequence run) and :mod:`~lorabench.protocols.resume`
(resumable sequences). docs/adding_a_paper.md walks through one paper.
"""
