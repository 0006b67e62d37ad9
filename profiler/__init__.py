"""Measure real engine steps and fit cost models to them (the only package importing torch or vLLM).

`profiler.run` times steps of a chosen composition on a real vLLM engine or a plain-torch
Llama decoder and writes a long-format profile; `profiler.fit` fits cost models to a
profile with cross-validated errors and writes files `sim.costmodels.load_cost_model` reads.
See docs/profiler.md.
"""
