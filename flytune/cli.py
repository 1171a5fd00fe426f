"""The ``flytune`` command line (also ``python -m flytune``)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from flytune.errors import FlytuneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="On-the-fly Bayesian fine-tuning of pretrained interatomic potentials.",
)
console = Console(stderr=True)


def _validation_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "settings"
    return f"invalid {where} = {err.get('input')!r}: {err['msg']}"


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    warnings.filterwarnings("ignore", message=".*accelerator.*")  # SevenNet's CPU notice
    try:
        app(standalone_mode=False)
    except FlytuneError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ValidationError as exc:
        console.print(f"[red]error:[/red] {_validation_message(exc)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # usage errors of the parser (click's, or typer's own)
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise


def print_metrics(results: dict[str, dict]) -> None:
    """One column per model, in the paper's kcal/mol-based units (the JSON has both)."""
    rows = [
        ("energy RMSE", "energy_rmse", "kcal/mol"),
        ("energy MAE", "energy_mae", "kcal/mol"),
        ("force RMSE", "force_rmse", "kcal/mol/Å"),
        ("force MAE", "force_mae", "kcal/mol/Å"),
        ("force MLL", "force_mll", "per component"),
        ("force MLL, recalibrated", "force_mll_recalibrated", "per component"),
        ("force AUC-ROC", "force_auc_roc", ""),
        ("force AUC-ROC, spread only", "force_auc_roc_spread", ""),
        ("force AUC-ROC, σ_F head only", "force_auc_roc_sigma_head", ""),
        ("calibration factor", "calibration_factor", "on σ²"),
    ]
    table = Table(title="evaluation (kcal/mol-based units)")
    table.add_column("metric")
    table.add_column("unit")
    for name in results:
        table.add_column(name, justify="right")
    for label, key, unit in rows:
        table.add_row(label, unit, *(f"{m[key + '_kcal']:.4g}" for m in results.values()))
    Console().print(table)


# -- commands --------------------------------------------------------------------------
Frames = Annotated[str, typer.Option(help="frames to use, a Python slice such as '0:50' or ':'")]


@app.command("finetune")
def finetune_cmd(
    data: Annotated[Path, typer.Option(help="labelled structures: extxyz (energy + forces) or sGDML .npz")],
    out: Annotated[Path, typer.Option(help="output folder (model.pt, finetune.json)")],
    backbone: Annotated[str, typer.Option(help="'7net-0', a SevenNet checkpoint or a MACE model file")] = "7net-0",
    chains: Annotated[int, typer.Option(help="number of chains M (>= 2)")] = 8,
    frames: Frames = ":",
    prior: Annotated[str, typer.Option(help="'transfer' (centred on the pretrained weights) or 'uninformative'")] = "transfer",
    sigma_prior: Annotated[Optional[float], typer.Option(help="σ_p (default 0.2 SevenNet, 0.5 MACE)")] = None,
    steps: Annotated[int, typer.Option(help="SGHMC steps of the initial phase")] = 2000,
    samples_per_chain: Annotated[int, typer.Option(help="samples per chain (1 + cosine cycles)")] = 1,
    cycle_steps: Annotated[int, typer.Option(help="steps per later cycle")] = 500,
    batch_size: Annotated[int, typer.Option(help="minibatch size B")] = 5,
    eta_start: Annotated[Optional[float], typer.Option(help="initial step size (default η_max of the backbone)")] = None,
    eta_end: Annotated[Optional[float], typer.Option(help="final step size of the initial phase (default η_start/10)")] = None,
    threshold: Annotated[float, typer.Option(help="ε; σ_E = 0.1·ε")] = 0.5,
    threshold_unit: Annotated[str, typer.Option(help="unit of ε: 'kcal/mol' or 'eV'")] = "kcal/mol",
    workers: Annotated[int, typer.Option(help="processes running chains in parallel")] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda (one GPU per worker in turn), cuda:N or auto")] = "cpu",
    seed: int = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    quiet: bool = False,
) -> None:
    """Fit a Bayesian ensemble to a labelled data set (offline fine-tuning)."""
    from flytune.config import ModelConfig, OfflineConfig, UncertaintyConfig

    _finetune(
        data,
        out,
        ModelConfig(backbone=backbone, chains=chains, prior=prior, sigma_prior=sigma_prior,
                    batch_size=batch_size, workers=workers, device=device),
        UncertaintyConfig(threshold=threshold, threshold_unit=threshold_unit),
        OfflineConfig(initial_steps=steps, samples_per_chain=samples_per_chain,
                      cycle_steps=cycle_steps, eta_start=eta_start, eta_end=eta_end, seed=seed),
        frames=frames,
        quiet=quiet,
        overwrite=overwrite,
    )


def _finetune(data, out, config, uncertainty, offline, *, frames=":", quiet=False, overwrite=False) -> dict:
    """:func:`flytune.finetune.finetune_folder` with a progress bar, Ctrl-C and a last line."""
    from flytune.finetune import MODEL_FILE, finetune_folder
    from flytune.progress import SamplingProgress, stop_on_sigint

    total = config.chains * (offline.initial_steps + (offline.samples_per_chain - 1) * offline.cycle_steps)
    with stop_on_sigint() as stop, SamplingProgress(total, "fine-tuning", quiet, console) as bar:
        summary = finetune_folder(data, out, config, uncertainty, offline, frames=frames, overwrite=overwrite,
                                  progress=bar, stop=stop)
    if summary["interrupted"]:
        console.print(f"[yellow]interrupted[/yellow]: kept {summary['n_members']} samples taken so far")
    console.print(
        f"wrote {out}/{MODEL_FILE}: {summary['n_members']} members from {summary['n_structures']} structures, "
        f"{summary['chain_steps_per_s']:.2f} chain-steps/s"
    )
    return summary


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[str, typer.Option(help="a folder from `flytune finetune`, or a backbone name for the pretrained model")],
    data: Annotated[Path, typer.Option(help="labelled test structures")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the metrics to this JSON file")] = None,
    frames: Frames = ":",
    force_threshold: Annotated[float, typer.Option(help="force error counted as large for the AUC-ROC, kcal/mol/Å")] = 1.0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
    quiet: bool = False,
) -> None:
    """Accuracy and uncertainty quality of a model on labelled structures."""
    from flytune.evaluation import evaluate_file

    metrics = evaluate_file(model, data, frames=frames, force_threshold_kcal=force_threshold, json_out=json_out,
                            device=device)
    if not quiet:
        print_metrics({model: metrics})


@app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Argument(help="TOML configuration (see `flytune init`)")],
    quiet: Annotated[bool, typer.Option(help="no progress display (batch jobs)")] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="validate the config, the structure, the reference and the Parsl set-up; start nothing")] = False,
) -> None:
    """Run (or resume) on-the-fly fine-tuning MD; Ctrl-C checkpoints and exits."""
    from flytune.otf.run import OnTheFlyRun
    from flytune.progress import RunProgress, stop_on_sigint
    from flytune.runconfig import load_run_config

    cfg = load_run_config(config)
    otf = OnTheFlyRun(cfg, log=lambda msg: console.print(msg, highlight=False))
    if check:
        for line in otf.describe():
            console.print(line, highlight=False, soft_wrap=True)
        console.print(f"{config}: ready to run (nothing was started)", highlight=False)
        return
    otf.open()
    try:
        total = max(cfg.walker_md(i).total_steps for i in range(cfg.walker_count))
        with stop_on_sigint() as stop, RunProgress(total, cfg.md.timestep_fs, quiet, console) as bar:
            summary = otf.advance(stop, bar, bar.update_step)
    finally:
        otf.close()
    print_summary(summary, cfg.run_dir)


@app.command("md")
def md_cmd(
    config: Annotated[Path, typer.Argument(help="the run's TOML configuration (its reference is not used)")],
    steps: Annotated[Optional[int], typer.Option(help="MD steps (default: the config's [md])")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress display (batch jobs)")] = False,
) -> None:
    """Production MD with the fine-tuned ensemble alone: σ and the calibrated P(|e| > ε)
    at every step; stops (or warns) when the trajectory leaves the trusted region."""
    from flytune.otf.production import production_md
    from flytune.progress import MDProgress, stop_on_sigint
    from flytune.runconfig import load_run_config

    cfg = load_run_config(config)
    level = 1 - cfg.uncertainty.confidence
    with stop_on_sigint() as stop, MDProgress(steps or cfg.md.total_steps, cfg.md.timestep_fs, quiet, console) as bar:
        summary = production_md(cfg, steps, stop, log=lambda msg: console.print(msg, highlight=False),
                                on_step=lambda step, results: bar(step, results, level))
    console.print(
        f"{summary['steps']} MD steps ({summary['simulated_ps']:.3f} ps) on {summary['model']}: "
        f"{summary['steps_above_level']} steps with P(|e| > ε) above {100 * level:g} % "
        f"(longest run {summary['longest_run_above_level']})"
        + (f"; stopped: {summary['stopped']}" if summary["stopped"] else ""), highlight=False, soft_wrap=True)


def _why_called(summary: dict) -> str:
    """Why the rule called: ' (first 1, probability 7, 5 of them raised by the label misfit)'."""
    reasons = summary.get("calls_by_reason") or {}
    if not reasons:
        return ""
    parts = [f"{reason} {n}" for reason, n in reasons.items()]
    by_misfit = summary.get("calls_by_label_misfit") or 0
    if by_misfit:
        parts.append(f"{by_misfit} of them raised by the label misfit")
    return " (" + ", ".join(parts) + ")"


def print_summary(summary: dict, run_dir: str) -> None:
    from flytune.otf.run import uncontrolled_line

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    warning = uncontrolled_line(summary)
    if warning:
        console.print(f"[bold red]warning:[/] {warning}", highlight=False, soft_wrap=True)
    console.print(
        f"{run_dir}: {summary['steps']} MD steps ({summary['simulated_ps']:.3f} ps), "
        f"{summary['reference_calls']} reference calls{_why_called(summary)}, "
        f"{fmt(summary['exceed_fraction'] and 100 * summary['exceed_fraction'], '.1f')} % of interventions above ε, "
        + (f"{100 * summary['force_exceed_fraction']:.1f} % above ε_F in forces, "
           if summary.get("force_exceed_fraction") is not None else "")
        + f"RMSE at interventions {fmt(summary['rmse_at_interventions_kcal'], '.3f')} kcal/mol; "
        f"wall time: MD {summary['time_md_s']:.0f} s, reference {summary['time_reference_s']:.0f} s, "
        f"updates {summary['time_update_s']:.0f} s ({summary.get('updates', '-')} updates); "
        f"speed-up over reference MD {fmt(summary.get('speedup_vs_reference_md'), '.2f')}× "
        f"(limit {fmt(summary.get('reference_over_prediction'), '.0f')}×)"
        + (f"; stopped: {summary['stopped']}" if summary.get("stopped") else "")
        + (f"; {summary['labels_pending']} label(s) not yet learned by model.pt: run the same command to "
           "resume and learn them" if summary.get("labels_pending") else ""),
        highlight=False,
        soft_wrap=True,
    )
    for w in summary.get("walkers") or []:
        console.print(
            f"  walker {w['walker']}: {w['steps']} MD steps, {w['reference_calls']} reference calls, "
            f"{fmt(w['exceed_fraction'] and 100 * w['exceed_fraction'], '.1f')} % above ε"
            + (f", [bold red]{w['steps_uncontrolled']} steps outside the promise[/]" if w["steps_uncontrolled"] else ""),
            highlight=False, soft_wrap=True)


@app.command("status")
def status_cmd(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Print the summary of a run directory."""
    path = run_dir / "summary.json"
    if not path.exists():
        raise FlytuneError(f"{str(run_dir)!r} has no summary.json; is it a flytune run directory?")
    summary = json.loads(path.read_text())
    print(json.dumps(summary, indent=2))
    print_summary(summary, str(run_dir))


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (finished, stopped or still running)")],
    out: Annotated[Optional[Path], typer.Option(help="where to write the report (default RUN_DIR/report)")] = None,
    json_only: Annotated[bool, typer.Option("--json", help="print the summary as JSON on stdout")] = False,
) -> None:
    """Figures (PNG), a self-contained report.html and report.json of an on-the-fly run."""
    from flytune.report import write_report

    summary = write_report(run_dir, out)
    if json_only:
        print(json.dumps(summary, indent=2))
    else:
        console.print(f"report written to {out or run_dir / 'report'}/report.html", highlight=False)


@app.command("export")
def export_cmd(
    source: Annotated[Path, typer.Argument(help="a run directory, a `flytune finetune` folder or a model.pt")],
    out: Annotated[Path, typer.Option(help="the folder to write the members and manifest.json into")],
) -> None:
    """Write each ensemble member in its backbone's own format (SevenNet .pth, MACE .model),
    for ASE and LAMMPS, with a manifest of the energy offset, ε and calibration."""
    from flytune.export import export

    manifest = export(source, out)
    use = manifest["use"]
    console.print(f"{len(manifest['members'])} members written to {out} ({manifest['package']}); "
                  f"energy offset {manifest['energy_offset_eV']} eV in {out / 'manifest.json'}\n"
                  f"ASE: {use['ase']}\nLAMMPS: {use['lammps_convert']}, then {'; '.join(use['lammps'])}",
                  highlight=False, soft_wrap=True)


@app.command("pack")
def pack_cmd(run_dir: Annotated[Path, typer.Argument(help="a stopped run directory")],
             archive: Annotated[Path, typer.Argument(help="the file to write (.tar.xz)")]) -> None:
    """Pack a run directory into one compressed file, to move it to another machine or keep
    it between batch jobs; `flytune unpack` restores it and `flytune run` resumes it."""
    from flytune.otf.rundir import pack

    path = pack(run_dir, archive)
    console.print(f"{run_dir} packed into {path} ({path.stat().st_size / 1e6:.1f} MB)", highlight=False)


@app.command("unpack")
def unpack_cmd(
    archive: Annotated[Path, typer.Argument(help="a file written by `flytune pack`")],
    run_dir: Annotated[Path, typer.Argument(help="the run directory to create (new or empty)")],
) -> None:
    """Restore a packed run directory; point the config's run_dir at it and `flytune run` resumes."""
    from flytune.otf.rundir import unpack

    console.print(f"unpacked into {unpack(archive, run_dir)}", highlight=False)


@app.command("init")
def init_cmd(
    path: Annotated[Path, typer.Argument(help="where to write the example configuration")] = Path("flytune.toml"),
    overwrite: bool = False,
) -> None:
    """Write a commented example configuration."""
    from flytune.runconfig import EXAMPLE

    if path.exists() and not overwrite:
        raise FlytuneError(f"{str(path)!r} exists; choose another path or pass --overwrite")
    path.write_text(EXAMPLE)
    console.print(f"wrote {path}")


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="output folder (config, run directory)")] = Path("demo-out"),
    steps: Annotated[Optional[int], typer.Option(help="MD steps of 0.5 fs (default: 300, 0.15 ps)")] = None,
    cycle_steps: Annotated[int, typer.Option(help="SGHMC steps per update")] = 40,
    max_calls: Annotated[Optional[int], typer.Option(help="cap on reference calls (default: none)")] = None,
    force_after: Annotated[Optional[int], typer.Option(
        help="force a reference call after this many steps without one (default: never)")] = None,
    quiet: bool = False,
) -> None:
    """On-the-fly fine-tuning of SevenNet-0 on ethanol (300 K, PySCF B3LYP/6-31G*); resumes if re-run."""
    from flytune.demo import DEMO_STEPS, write_demo

    steps = steps or DEMO_STEPS
    config = write_demo(out, steps=steps, cycle_steps=cycle_steps, max_calls=max_calls, force_after=force_after)
    console.print(f"demo: on-the-fly ethanol, {steps} steps of 0.5 fs, config {config}")
    run_cmd(config, quiet=quiet)


@app.command("demo-finetune")
def demo_finetune_cmd(
    data: Annotated[Optional[Path], typer.Option(help="sGDML ethanol CCSD(T) file")] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("demo-finetune-out"),
    train_frames: int = 20,
    test_frames: int = 100,
    chains: int = 2,
    steps: int = 300,
    workers: int = 2,
    quiet: bool = False,
) -> None:
    """Fine-tune SevenNet-0 on a few CCSD(T) ethanol frames and compare before/after."""
    from flytune.config import ModelConfig, OfflineConfig, UncertaintyConfig
    from flytune.demo import split_finetune_demo
    from flytune.evaluation import evaluate_file

    train, test = split_finetune_demo(data, out, train_frames, test_frames)
    console.print(f"demo: {train_frames} training and {test_frames} test frames")
    _finetune(train, out / "model", ModelConfig(backbone="7net-0", chains=chains, workers=workers),
              UncertaintyConfig(), OfflineConfig(initial_steps=steps, eta_start=1e-3, eta_end=1e-4),
              quiet=quiet, overwrite=True)
    before = evaluate_file("7net-0", test)
    after = evaluate_file(str(out / "model"), test)
    print_metrics({"SevenNet-0": before, "fine-tuned": after})
    (out / "demo.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
    Console().print(
        f"force RMSE {before['force_rmse_kcal']:.2f} → {after['force_rmse_kcal']:.2f} kcal/mol/Å, "
        f"energy RMSE {before['energy_rmse_kcal']:.2f} → {after['energy_rmse_kcal']:.2f} kcal/mol"
    )
