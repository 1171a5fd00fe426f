"""flytune: on-the-fly Bayesian fine-tuning of pretrained interatomic potentials
(the method with its equations: ``docs/method.md``).

What a script needs, from ``import flytune``:

- :class:`OnTheFlyCalculator` — the ASE calculator that fine-tunes as it goes
  (``OnTheFlyCalculator.from_pretrained("7net-0", reference=..., threshold="0.5 kcal/mol")``);
- :class:`Ensemble` — M SGHMC chains around the pretrained weights (predict, update, save);
- :func:`load` — a saved ensemble (``model.pt`` of a run, or of ``finetune``);
- :func:`finetune` / :func:`evaluate` — offline fine-tuning on a data set, and its metrics.

The rest lives in its module: :func:`flytune.backbones.load_backbone`,
:class:`flytune.otf.decision.Decision`, :func:`flytune.otf.run.run` (a whole run from a
configuration, resumable). Torch and the backbones load on first use, not on import.
"""

from flytune.errors import FlytuneError

__version__ = "0.1.0"
__all__ = ["Ensemble", "FlytuneError", "OnTheFlyCalculator", "evaluate", "finetune", "load", "__version__"]


def load(path, workers: int | None = None, device: str | None = None):
    """A saved ensemble (:meth:`Ensemble.load`); ``workers`` and ``device`` override the saved ones."""
    from flytune.bayes.ensemble import Ensemble

    return Ensemble.load(path, workers=workers, device=device)


def __getattr__(name: str):
    if name == "OnTheFlyCalculator":
        from flytune.otf.calculator import OnTheFlyCalculator

        return OnTheFlyCalculator
    if name == "Ensemble":
        from flytune.bayes.ensemble import Ensemble

        return Ensemble
    if name == "finetune":
        from flytune.finetune import finetune

        return finetune
    if name == "evaluate":
        from flytune.evaluation import evaluate

        return evaluate
    raise AttributeError(f"module 'flytune' has no attribute {name!r}")
