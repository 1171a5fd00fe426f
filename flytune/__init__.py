"""flytune: on-the-fly Bayesian fine-tuning of pretrained interatomic potentials
(the method with its equations: ``docs/method.md``).

Public entry points:

- :func:`flytune.backbones.load_backbone` — a pretrained potential behind one torch interface;
- :class:`flytune.bayes.ensemble.Ensemble` — M SGHMC chains around the pretrained weights;
- :class:`flytune.otf.decision.Decision` — the calibrated call-or-not rule with its safety nets;
- :class:`flytune.otf.calculator.OnTheFlyCalculator` — the ASE calculator that fine-tunes as it goes;
- :func:`flytune.otf.run.run` — a whole on-the-fly run from a configuration, resumable;
- :func:`flytune.finetune.finetune` / :func:`flytune.evaluation.evaluate` — offline use.
"""

from flytune.errors import FlytuneError

__version__ = "0.1.0"
__all__ = ["FlytuneError", "__version__"]
