"""Samplers and likelihoods: reverse-time SDE, predictor–corrector, probability-flow ODE.

Public API::

    solvers.sample(sde, score_fn, shape, solver="pf_ode", steps=None, eps=None, z=None, seed=None,
                   sigma_data=None, cond=None, **options)
    solvers.log_likelihood(sde, score_fn, x, eps=1e-5, rtol=1e-5, atol=1e-5, divergence="exact", cond=None, **options)
    solvers.variational_bound(sde, score_fn, x, seed=0, variance=None)   # the discrete chain's bound
    solvers.available(), solvers.get_solver(name)
    solvers.time_grid(sde, eps, steps, kind)                             # the grids any fixed-step solver takes
    solvers.inpaint(sde, score_fn, x_known, mask, method="smc", particles=16, ...)   # fill in unknown entries

A model is any ``score_fn(x, t, **cond)``; a solver is one module of this package with a class
registered by ``@solvers.register``, plus its ``conf/solver/<name>.yaml``.
"""
from core_lib import import_submodules
from solvers import exponential, ode, pc  # noqa: F401  (registers the solvers, in this order)
from solvers.base import (DEFAULT_SIGMA_DATA, NonFiniteError, SampleResult, ScoreFn, Solver, SolverError, available,
                          get_solver, register, resolve_eps, sample)
from solvers.bound import BoundResult, variational_bound
from solvers.grids import GRIDS, time_grid
from solvers.inpaint import inpaint
from solvers.likelihood import LikelihoodResult, bits_per_dim, log_likelihood
from solvers import guidance  # noqa: F401  (solvers.guidance.GuidedScore: the one guidance wrapper)

import_submodules("solvers")   # any other module of this package registers its solvers too

__all__ = ["sample", "log_likelihood", "variational_bound", "available", "get_solver", "register", "Solver",
           "SampleResult", "LikelihoodResult", "BoundResult", "bits_per_dim", "time_grid", "GRIDS", "resolve_eps",
           "ScoreFn", "DEFAULT_SIGMA_DATA", "SolverError", "NonFiniteError", "inpaint"]
