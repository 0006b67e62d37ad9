"""Capacity planning as a library: no Hydra, no config files, callable from apps and notebooks.

`planner.capacity`: the highest request rate a system serves within its SLO (bracketing and
bisection on QPS, a sustainability (drain) condition, seeds pooled), and the best way to
split replicas between pools. The caller supplies the simulation as a function of the rate.
"""
