"""Numerics that several passes share, kept out of the pass files: the rotations rotate folds
into weights, the LinearPatch and MLP patch fits, calibration in stages (GPTQ's Hessians), the
weight quantizers' solvers (RTN, GPTQ) and the end-to-end scale tuning."""
