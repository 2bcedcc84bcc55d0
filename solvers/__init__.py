"""Samplers and likelihoods: reverse-time SDE, predictor–corrector, probability-flow ODE.

Public API::

    solvers.sample(sde, score_fn, shape, solver="pf_ode", steps=None, eps=None, z=None, seed=None, **options)
    solvers.log_likelihood(sde, score_fn, x, eps=1e-5, rtol=1e-5, atol=1e-5, divergence="exact", **options)
    solvers.variational_bound(sde, score_fn, x, seed=0, variance=None)   # the discrete chain's bound
    solvers.available()
"""
from solvers import exponential, ode, pc  # noqa: F401  (registers the solvers)
from solvers.base import (NonFiniteError, SampleResult, SolverError, available, get_solver, register,
                          sample)
from solvers.bound import BoundResult, variational_bound
from solvers.likelihood import LikelihoodResult, bits_per_dim, log_likelihood

__all__ = ["sample", "log_likelihood", "variational_bound", "available", "get_solver", "register", "SampleResult",
           "LikelihoodResult", "BoundResult", "bits_per_dim", "SolverError", "NonFiniteError"]
