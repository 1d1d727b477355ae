"""Compiled (numba) kernels of the data layer, behind the modules that define what they compute.

``ranking``: the tokenizer's rank-value sort; ``median_select``: the gene medians' exact radix
select; ``negative_binomial``: the synthetic cohort's counts; ``geo_text``: GEO text parsing and
formatting. Each is compiled on first use and cached on disk.
"""
