"""Benchmarks of bayes_mdn: the real-data suite (``benchmarks.real_data``).

Not part of the installed package; nothing in ``bayes_mdn`` imports it. Run from a checkout.
"""
