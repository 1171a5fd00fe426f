"""Reading ``flytune run`` configuration files (TOML) with one-line, actionable errors."""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ValidationError

from flytune.config import RunConfig
from flytune.errors import FlytuneError

EXAMPLE = '''\
# flytune on-the-fly run. Every setting not given takes the method's default.
structure = "ethanol.xyz"      # any ASE-readable file; the last frame is used
run_dir = "runs/ethanol"       # created; running the same command again resumes
seed = 1

[model]
backbone = "7net-0"            # or a SevenNet checkpoint (.pth) / MACE model file
posterior = "sghmc"
chains = 8                     # M; 4 is the fast setting
cycle_steps = 2000             # SGHMC steps per update (K)
workers = 2                    # processes running chains (one per core or GPU)
# device = "cpu"               # cpu | cuda | cuda:N | auto

[reference]
name = "pyscf"                 # pyscf | tblite | cp2k | an import path "module:Class"
retries = 2                    # extra attempts after a failed call
on_failure = "stop"            # stop | skip (continue with the model)
# timeout_s = 86400            # backend "parsl": an attempt without a result by then fails
[reference.options]            # keyword arguments of the calculator
xc = "b3lyp"
basis = "6-31g*"
density_fit = true

[uncertainty]
threshold = 0.5                # ε
threshold_unit = "kcal/mol"    # or "eV"
confidence = 0.95              # call the reference when P(|e| > ε) > 5 %
label_misfit = true            # σ also counts how far the members miss their newest label
label_misfit_as = "bias"       # that miss, carried to first order, is the error expected ("spread": its size raises σ;
                               # "correction": it is taken off the energy and forces the MD is given;
                               # faster, but measured above the 5 % promise far from labels: docs/method.md §6)
correction_order = 1           # 2 (with "correction"): also the members' curvature about the label, scaled by the
                               # reference-to-members curvature ratio fitted at the calls (helps a soft foundation,
                               # measured above the 5 % promise on a close one: docs/method.md §6)
calibration_checks = 5         # calls at 1, 2, 4, 8, 16 steps from the last until 5 errors are seen
calibration_discount = 1.0     # γ < 1: the error seen k calls ago weighs γ^k (memory ≈ 1/(1−γ) calls)
criterion = "energy"           # energy | forces | both: which P(error > threshold) decides a call
# force_threshold = 1.0        # ε_F, the largest tolerated error of one atom's force (forces, both)
# force_threshold_unit = "kcal/mol/A"   # or "eV/A"
# force_calibration = "largest_atom"    # calibrate each call's largest atom error, the statistic ε_F bounds;
                                        # "components": one factor on all force variances (docs/method.md §6)
trigger = "probability"        # the method; baselines for comparison: "spread" (σ > spread_fraction·ε),
                               # "force_deviation" (max per-atom force deviation > force_deviation_threshold)

[md]
driver = "langevin"            # langevin | verlet | nose-hoover | npt
timestep_fs = 0.5
temperature_K = 300
steps = 20000
friction_per_fs = 0.01
# schedule = [{steps = 2000, temperature_K = 300}, {steps = 2000, temperature_K = 800, ramp = true}]

[safety]
# max_reference_calls = 500
min_steps_between_calls = 0
# force_call_after = 2000
# max_temperature_K = 2000
max_force_eV_A = 50

[updates]                      # when a label is learned by a posterior update
policy = "every"               # every | deferred (wait until the calls since the last update cost as much as one)
max_pending = 16               # deferred: update once this many labels wait
critical_factor = 1.0          # deferred: update at once when |error| > this × ε
max_cycles = 1                 # more cycles on the same labels while the newest is not learned, up to this many
final_cycles = 1               # after the last MD step: cycles over all labels, for the model the run leaves
background = false             # true: update in the worker processes while the MD goes on

[execution]                    # where the reference calls run
backend = "local"              # local (this process) | parsl (docs/examples/slurm_vasp.toml)
# parsl = "htex_local"         # htex_local | slurm ([execution.slurm]) | a .py file defining a Parsl `config`
# max_workers = 1              # reference calls at once (on this machine, or per SLURM job)
# mpi_launcher = "srun -n 64"  # put before reference.options.command in the workers

# Several trajectories teaching one ensemble: one [[walkers]] table each (none: one walker).
# Each may set structure, temperature_K or schedule, seed and md = {...}; the rest is the run's.
# [[walkers]]
# temperature_K = 300
# [[walkers]]
# temperature_K = 600
# md = {friction_per_fs = 0.02}
'''


_KEY_LINE = re.compile(r"^(?P<off>#\s*)?(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?P<value>.*?)(?P<comment>\s+#.*)?$")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # strings (TOML basic strings share JSON's escapes)


def example_config(settings: Mapping[str, object]) -> str:
    """:data:`EXAMPLE` with ``settings`` (``"key"`` at the top, ``"section.key"`` in a
    table; plain values) set in place, comments kept; a commented-out line is switched on,
    a key the example lacks is added at the end of its table."""
    pending = dict(settings)
    out: list[str] = []
    section = ""

    def flush(section: str) -> None:
        for dotted in [k for k in pending if k.rpartition(".")[0] == section]:
            out.append(f"{dotted.rpartition('.')[2]} = {_toml_value(pending.pop(dotted))}")

    for line in EXAMPLE.splitlines():
        header = re.match(r"^\[([A-Za-z_.]+)\]", line)
        if header:
            blanks = []
            while out and not out[-1].strip():
                blanks.append(out.pop())
            flush(section)
            out.extend(blanks)
            section = header.group(1)
            out.append(line)
            continue
        match = _KEY_LINE.match(line)
        dotted = f"{section}.{match.group('key')}" if match and section else match.group("key") if match else None
        if dotted in pending:
            text = f"{match.group('key')} = {_toml_value(pending.pop(dotted))}"
            comment = (match.group("comment") or "").strip()
            line = f"{text:<30} {comment}" if comment else text
        out.append(line)
    flush(section)
    if pending:
        raise ValueError(f"keys without a table in the example: {sorted(pending)}")
    return "\n".join(out) + "\n"


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def validation_message(exc: ValidationError, model: type[BaseModel]) -> str:
    """The first error as one line, with a "did you mean" for misspelt keys."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        names = _field_names(model, err["loc"])
        close = difflib.get_close_matches(str(err["loc"][-1]), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
        return f"unknown key {where!r}{hint}"
    if err["type"] == "missing":
        return f"missing required key {where!r}"
    return f"invalid {where} = {err.get('input')!r}: {err['msg']}"


#: the tables whose settings a script passes as keywords (:func:`keyword_settings`)
KEYWORD_SECTIONS = ("model", "uncertainty", "safety", "updates")


def keyword_settings(settings: Mapping[str, object], **given: dict) -> dict[str, BaseModel]:
    """``[model]``, ``[uncertainty]``, ``[safety]`` and ``[updates]`` of a run from flat
    keywords with the TOML's names (``chains=4``, ``confidence=0.9``, ``policy="deferred"``),
    each validated as in a config file; ``given`` adds settings per table. A misspelt or
    invalid keyword is a one-line :class:`FlytuneError`."""
    tables = {name: RunConfig.model_fields[name].annotation for name in KEYWORD_SECTIONS}
    owner = {key: name for name, model in tables.items() for key in model.model_fields}
    values: dict[str, dict] = {name: dict(given.get(name, {})) for name in KEYWORD_SECTIONS}
    for key, value in settings.items():
        if key not in owner:
            close = difflib.get_close_matches(key, owner, n=1)
            raise FlytuneError(f"unknown setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else
                               f"; the settings of {', '.join(f'[{t}]' for t in KEYWORD_SECTIONS)} are known"))
        values[owner[key]][key] = value
    out = {}
    for name, model in tables.items():
        try:
            out[name] = model.model_validate(values[name])
        except ValidationError as exc:
            raise FlytuneError(validation_message(exc, model)) from None
    return out


def load_run_config(path: str | Path) -> RunConfig:
    """Parse and validate a run configuration; relative paths are taken from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FlytuneError(f"config file {str(path)!r} not found; write one with `flytune init {path}`")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise FlytuneError(f"{path}: malformed TOML ({exc})") from None
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise FlytuneError(f"{path}: {validation_message(exc, RunConfig)}") from None
    base = path.resolve().parent
    updates = {}
    for key in ("structure", "run_dir"):
        value = Path(getattr(config, key))
        if not value.is_absolute():
            updates[key] = str(base / value)
    production = {k: str(base / v) for k in ("model", "out")
                  if (v := getattr(config.production, k)) is not None and not Path(v).is_absolute()}
    if production:
        updates["production"] = config.production.model_copy(update=production)
    walkers = [w.model_copy(update={"structure": str(base / w.structure)})
               if w.structure is not None and not Path(w.structure).is_absolute() else w for w in config.walkers]
    if walkers != config.walkers:
        updates["walkers"] = walkers
    backbone = base / config.model.backbone
    if not Path(config.model.backbone).is_absolute() and backbone.is_file():  # a model file next to the config
        updates["model"] = config.model.model_copy(update={"backbone": str(backbone)})
    parsl_file = Path(config.execution.parsl)
    if parsl_file.suffix == ".py" and not parsl_file.is_absolute():
        updates["execution"] = config.execution.model_copy(update={"parsl": str(base / parsl_file)})
    return config.model_copy(update=updates)
