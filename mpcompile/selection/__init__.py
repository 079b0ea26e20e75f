"""Which layers become 2:4: the predicted orders (MP, SEB, MACs), the measured drift order,
the ``--max-drift`` budget search and the ``--only-profitable`` filter."""
