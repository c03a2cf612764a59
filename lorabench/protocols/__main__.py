"""``lorabench rebuild <paper> RUNS... [--out DIR]``, or ``python -m lorabench.protocols rebuild ...``: any paper's
tables, CSVs, verdicts and plots rebuilt from finished runs' results.json files, without re-running them (the papers:
:data:`lorabench.protocols.base.PAPERS`). ``python -m lorabench.protocols.<paper> RUNS...`` still works
and does the same."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from lorabench.errors import ConfigError
from lorabench.protocols.base import PAPERS, paper
from lorabench.protocols.report import rebuild_cli

USAGE = (f"usage: lorabench rebuild {{{','.join(PAPERS)}}} RUNS... [--out DIR]"
         "  (or python -m lorabench.protocols rebuild ...)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Dispatch ``rebuild <paper> ...`` to the paper's rebuild command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "rebuild":
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    try:
        paper(argv[1])
    except ConfigError as err:  # an unknown paper: the usage, and one line listing the papers
        print(f"{USAGE}\nlorabench: error: {err}", file=sys.stderr)
        sys.exit(2)
    rebuild_cli(argv[1], argv[2:])


if __name__ == "__main__":
    main()
