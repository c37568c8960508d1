"""``python -m xmctag``: the same command line as the ``xmctag`` script."""

from xmctag.cli import main

main()
