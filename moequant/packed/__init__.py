"""The GPTQ packed layout, its one owner: widths and groups (``widths``), the bit stream (``bitstream``),
the tensors' shapes, sizes and checks (``shapes``), and joined or stacked linears (``experts``)."""
