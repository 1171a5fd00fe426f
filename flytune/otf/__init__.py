"""The on-the-fly loop: ASE calculator, reference calculators, run directory and driver."""
