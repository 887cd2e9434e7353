"""Graph rewrites that make and improve the INT8 model: Q/DQ placement and the options around it."""
