"""flytune: on-the-fly Bayesian fine-tuning of pretrained interatomic potentials.

Public entry points:

- :func:`flytune.backbones.load_backbone` — a pretrained potential behind one torch interface;
- :class:`flytune.bayes.ensemble.Ensemble` — M SGHMC chains around the pretrained weights;
- :mod:`flytune.bayes.calibration` — the on-the-fly calibrated decision;
- :func:`flytune.finetune.finetune` / :func:`flytune.finetune.evaluate` — offline use.
"""

from flytune.errors import FlytuneError

__version__ = "0.1.0"
__all__ = ["FlytuneError", "__version__"]
