"""Benchmarks of bayes_mdn: the real-data suite (``benchmarks.real_data``), the per-step,
time-to-target, predictive and scaling timings (``steps``), the whole-fit timings (``speed``,
``numpyro_speed``, ``compile_step``), streamed fits (``streaming``) and the data-with-a-hole
problem (``hole``).

Not part of the installed package; nothing in ``bayes_mdn`` imports it. Run from a checkout.
"""
