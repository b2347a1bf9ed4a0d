"""Quantisation maths: grids, solvers (RTN, GPTQ), Hessians and the GPTQ packed layout."""
