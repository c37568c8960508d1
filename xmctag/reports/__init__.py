"""Reports about prediction files for the people who run the nightly job: ``diff`` (what changed between two runs),
and its renderings (``table``: the terminal, ``html``: a self-contained page)."""
