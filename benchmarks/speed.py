"""Speed of prediction and of posterior updates, on ethanol (9 atoms) and a 64-atom Si cell.

Sections (each stored in ``results/speed.json`` as soon as it is measured; a re-run
skips what is there unless ``--force``):

- ``ensemble``: one MD-step prediction of M = 8 members in one pass (vmap) and as a loop,
  over one member's; minimum of repeated timings.
- ``chain_steps``: SGHMC chain-steps per second, SevenNet-0, minibatch of 5 structures:
  the per-structure loop (5 graphs, gradients summed: the baseline), one batched graph,
  and one batched graph in 2 resident worker processes (the fast path). ``torch.compile``
  is not used: see ``compile_notes``.
- ``profile``: where a batched chain-step spends its time (torch profiler, top operators).
- ``update``: wall time of ``Ensemble.update`` after a new ethanol label with the fast
  settings (measured), and with the paper's defaults (8 chains × 2000 steps, derived
  from the measured fast-path rate: one such update takes ~46 min here).
- ``reference``: one PySCF B3LYP/6-31G* (density fitting) call on ethanol, one GFN1-xTB
  (tblite) call on Si64.
- ``gpu`` (not in the default list): on a CUDA machine, one-pass prediction there and the
  update after a new ethanol label with the fast settings and with the paper's defaults,
  measured end to end, one worker process per chain sharing the GPU; written to
  ``results/speed_gpu.json`` with that machine's description (``benchmarks/gpu.sh``
  runs it on a lent device machine). Without CUDA it copies that file, if present, into
  ``speed.json`` under ``gpu``.

    .venv/bin/python benchmarks/speed.py [--only ensemble,update] [--force]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, molecule
from common import ETHANOL_CCSD_T, RESULTS, machine, write_results
from torch.func import functional_call

from flytune.bayes import sghmc
from flytune.bayes.posterior import log_posterior
from flytune.bayes.ensemble import Ensemble, _member_outputs
from flytune.bayes.minibatch import draw_minibatch
from flytune.config import ModelConfig
from flytune.data import labelled, read_labelled

#: the fast settings measured here (README "Speed"; they fail the quality guard)
FAST = dict(chains=4, cycle_steps=100, eta_max=3e-4, early_stop=True, early_stop_window=15, workers=2)
PAPER = dict(chains=8, cycle_steps=2000)
COMPILE_NOTES = [
    "training step: the force loss needs a second derivative through the force "
    "(autograd.grad with create_graph=True); torch.compile (AOTAutograd) raises "
    "'torch.compile with aot_autograd does not currently support double backward' "
    "(checked on torch 2.13.0 with a 2-layer MLP), so the SGHMC step runs eagerly",
    "prediction: torch._dynamo.explain finds 0 graphs in vmap(functional_call(...)) over "
    "SevenNet, and graph breaks at autograd.grad, Tensor.tolist and Tensor.item in the "
    "single-member path; no speed-up measured (0.163 s compiled vs 0.19-0.30 s eager, "
    "within the noise of eager runs), so prediction runs eagerly",
]


def best_time(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # kernels run asynchronously
        times.append(time.perf_counter() - start)
    return min(times)


def silicon64(seed: int) -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=seed)
    return atoms


def self_labelled(structures):
    """Structures labelled by stock SevenNet-0 (labels do not change timings)."""
    from sevenn.calculator import SevenNetCalculator

    calc = SevenNetCalculator("7net-0", device="cpu")
    out = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        stress = atoms.get_stress(voigt=False) if atoms.pbc.all() else None
        out.append(labelled(atoms, atoms.get_potential_energy() + 0.1, atoms.get_forces() * 1.05, stress))
    return out


@functools.cache
def systems() -> dict[str, list]:
    return {
        "ethanol": read_labelled(ETHANOL_CCSD_T, "0:12"),
        "si64": self_labelled([silicon64(s) for s in range(8)]),
    }


# -- sections -------------------------------------------------------------------------
def _ensemble_timings(frames, device: str = "cpu") -> dict:
    """One MD-step prediction of 8 members: one member, all in one pass (vmap), a loop."""
    ens = Ensemble.from_config(ModelConfig(chains=8, prior="uninformative", device=device), seed=1)
    batch = ens.model.backbone.batch(frames[:1]).to(device)
    members = ens.members
    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    one = best_time(lambda: _member_outputs(ens.model, members[0], batch, functional=True))
    vmapped = best_time(
        lambda: torch.func.vmap(lambda p: _member_outputs(ens.model, p, batch, functional=True))(stacked)
    )
    loop = best_time(lambda: [_member_outputs(ens.model, p, batch) for p in members], repeats=5)
    print(f"one member {one * 1e3:.1f} ms, 8 in one pass {vmapped * 1e3:.1f} ms "
          f"({vmapped / one:.2f}x), loop {loop * 1e3:.1f} ms ({loop / one:.2f}x)")
    return {"single_s": one, "one_pass_s": vmapped, "loop_s": loop,
            "one_pass_over_single": vmapped / one, "loop_over_single": loop / one}


def ensemble_section(structures) -> dict:
    torch.set_num_threads(2)
    out = {}
    for name, frames in structures.items():
        print(f"{name}: ", end="")
        out[name] = _ensemble_timings(frames)
    return {"ensemble": out, "ensemble_over_single_full": out["ethanol"]["one_pass_over_single"]}


def _in_process_rates(frames, steps: int) -> dict:
    """Chain-steps/s in this process (2 threads): per-structure loop vs one batched graph."""
    torch.set_num_threads(2)
    ens = Ensemble.from_config(ModelConfig(chains=2), seed=0)
    ens.add_data(frames)
    model, data = ens.model, ens.data
    one_graph = log_posterior(model, ens.prior, len(data))

    def batched(params, batch):
        return one_graph(params, batch[:3])

    def looped(params, batch):  # each structure its own graph; the same −Ũ
        weights, indices = batch[2], batch[3]
        total, lls = ens.prior.log_prob(params) / len(data), []
        for b, i in enumerate(indices):
            graphs, labels = data.batch([int(i)])
            pred = functional_call(model, params, (graphs,), {"create_graph": True})
            ll = model.log_likelihood(pred, labels, graphs)
            total = total + weights[b] * ll.sum()
            lls.append(ll.detach())
        return total, torch.cat(lls)

    generator = torch.Generator().manual_seed(0)
    draws = [draw_minibatch(len(data), 5, generator, True) for _ in range(steps + 1)]
    rates = {}
    for name, fn in (("loop", looped), ("batched", batched)):
        sampler = sghmc.build(fn, has_aux=True)
        state = sampler.init(ens.prior.centre)
        start = None
        for k, (indices, weights) in enumerate(draws):
            if k == 1:
                start = time.perf_counter()  # the first step warms up
            graphs, labels = data.batch(indices)
            state = sampler.update(state, (graphs, labels, weights, indices), lr=1e-5, num_data=len(data),
                                   generator=generator)
        rates[name] = steps / (time.perf_counter() - start)
    return rates


def _parallel_rate(frames, steps: int) -> float:
    """Chain-steps/s of 2 chains in 2 resident workers (1 thread each), one batched graph."""
    config = ModelConfig(chains=2, cycle_steps=steps, workers=2, threads_per_worker=1)
    with Ensemble.from_config(config, seed=0) as ens:
        ens.add_data(frames[:-2])
        ens.update([frames[-2]])  # starts the workers, builds their graphs
        start = time.perf_counter()
        ens.update([frames[-1]])
        return 2 * steps / (time.perf_counter() - start)


def chain_steps_section(structures) -> dict:
    out = {}
    for name, frames in structures.items():
        steps = 20 if name == "ethanol" else 4
        rates = _in_process_rates(frames[:8], steps)
        rates["parallel_batched"] = _parallel_rate(frames[:8], 2 * steps)
        rates["fast_over_loop"] = rates["parallel_batched"] / rates["loop"]
        out[name] = rates
        print(f"{name}: chain-steps/s loop {rates['loop']:.2f}, batched {rates['batched']:.2f}, "
              f"batched + 2 workers {rates['parallel_batched']:.2f} ({rates['fast_over_loop']:.1f}x)")
    eth = out["ethanol"]
    return {"chain_steps": out, "chain_steps_per_s_loop": eth["loop"],
            "chain_steps_per_s_batched": eth["batched"], "chain_steps_per_s_fast": eth["parallel_batched"],
            "compile_notes": COMPILE_NOTES}


def profile_section(structures) -> dict:
    from torch.profiler import profile

    torch.set_num_threads(2)
    ens = Ensemble.from_config(ModelConfig(chains=2), seed=0)
    ens.add_data(structures["ethanol"][:8])
    sampler = sghmc.build(log_posterior(ens.model, ens.prior, len(ens.data)), has_aux=True)
    generator = torch.Generator().manual_seed(0)
    state = sampler.init(ens.prior.centre)

    def step(state):
        indices, weights = draw_minibatch(len(ens.data), 5, generator, True)
        graphs, labels = ens.data.batch(indices)
        return sampler.update(state, (graphs, labels, weights), lr=1e-5, num_data=len(ens.data), generator=generator)

    state = step(state)
    with profile() as prof:
        for _ in range(5):
            state = step(state)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    top = [{"op": e.key, "self_cpu_share": e.self_cpu_time_total / total, "calls_per_step": e.count / 5}
           for e in events[:12]]
    ops_per_step = sum(e.count for e in events if e.key.startswith("aten::")) / 5
    for t in top:
        print(f"{t['op']:45s} {100 * t['self_cpu_share']:5.1f} %  {t['calls_per_step']:.0f} calls/step")
    return {"profile": {"top_ops": top, "aten_calls_per_step": ops_per_step}}


def update_section(structures, fast_rate: float | None) -> dict:
    frames = structures["ethanol"]
    config = ModelConfig(**FAST, threads_per_worker=1)
    walls, steps = [], []
    with Ensemble.from_config(config, seed=0) as ens:
        ens.add_data(frames[:8])
        for frame in frames[8:12]:
            start = time.perf_counter()
            ens.update([frame])
            walls.append(time.perf_counter() - start)
            steps.append([c.state.step for c in ens.chains])
    print(f"fast update (labels 9-12): {', '.join(f'{w:.0f} s' for w in walls)}; steps per chain {steps}")
    out = {"update_fast": {"settings": FAST, "wall_s": walls, "steps_per_chain": steps},
           "update_s_fast_ethanol": float(np.mean(walls[1:]))}  # the first one starts the workers
    if fast_rate:
        out["update_s_paper_ethanol"] = PAPER["chains"] * PAPER["cycle_steps"] / fast_rate
        out["update_paper_note"] = ("derived: 8 x 2000 chain-steps at chain_steps_per_s_fast "
                                    "(2 resident workers, one batched graph); not run end to end here")
    return out


def reference_section(structures) -> dict:
    from flytune.otf.reference import make_reference

    pyscf = make_reference("pyscf", {"xc": "b3lyp", "basis": "6-31g*", "density_fit": True})
    atoms = molecule("CH3CH2OH")
    start = time.perf_counter()
    pyscf.compute(atoms)
    cold = time.perf_counter() - start
    atoms.rattle(0.02, seed=1)
    start = time.perf_counter()
    pyscf.compute(atoms)
    warm = time.perf_counter() - start
    tblite = make_reference("tblite", {"method": "GFN1-xTB"})
    start = time.perf_counter()
    tblite.compute(silicon64(0))
    si = time.perf_counter() - start
    print(f"PySCF ethanol: {cold:.1f} s (first), {warm:.1f} s (next step); GFN1-xTB Si64: {si:.1f} s")
    return {"reference": {"pyscf_b3lyp_ethanol_first_s": cold, "pyscf_b3lyp_ethanol_next_s": warm,
                          "gfn1_si64_s": si}, "reference_s_ethanol": warm, "reference_s_si64": si}


def _timed_update(frames, settings: dict, device: str, budget_s: float) -> dict:
    """Wall time of one update after a new label (8 labels before it), one worker per chain.

    A 20-step update first starts the workers, then a second one gives the rate, from
    which the full update's time is foreseen; it runs only if that fits ``budget_s``."""
    chains, probe = settings["chains"], 20
    config = ModelConfig(**{**settings, "workers": chains}, threads_per_worker=1, device=device)
    with Ensemble.from_config(config.model_copy(update={"cycle_steps": probe, "early_stop": False}), seed=0) as ens:
        ens.add_data(frames[:7])
        start = time.perf_counter()
        ens.update([frames[7]])  # starts the workers
        out = {"settings": settings, "workers": chains, "first_update_s": time.perf_counter() - start}
        start = time.perf_counter()
        ens.update([frames[8]])
        out["chain_steps_per_s"] = chains * probe / (time.perf_counter() - start)
        out["foreseen_update_s"] = foreseen = chains * settings["cycle_steps"] / out["chain_steps_per_s"]
        if foreseen > budget_s:
            out["skipped"] = f"foreseen {foreseen:.0f} s at the probe's rate, over the budget of {budget_s:.0f} s"
        else:
            ens.config = config  # the full cycle
            start = time.perf_counter()
            ens.update([frames[9]])
            out["update_s"] = time.perf_counter() - start
    print(f"{settings['chains']} x {settings['cycle_steps']}: {out['chain_steps_per_s']:.1f} chain-steps/s, "
          f"update {out.get('update_s', float('nan')):.1f} s {out.get('skipped', '')}")
    return out


def gpu_section(budget_s: float) -> dict:
    gpu_file = RESULTS / "speed_gpu.json"
    if not torch.cuda.is_available():
        if not gpu_file.exists():
            raise SystemExit("gpu: no CUDA device here and no results/speed_gpu.json (see benchmarks/gpu.sh)")
        print(f"gpu: no CUDA device here; copying {gpu_file.name} into speed.json")
        return {"gpu": json.loads(gpu_file.read_text())}
    frames = read_labelled(ETHANOL_CCSD_T, "0:10")
    out = {"device_name": torch.cuda.get_device_name(0)}
    parts = {"ensemble_ethanol": lambda: _ensemble_timings(frames, "cuda"),
             "update_fast_ethanol": lambda: _timed_update(frames, FAST, "cuda", budget_s),
             "update_paper_ethanol": lambda: _timed_update(frames, PAPER, "cuda", budget_s)}
    for name, measure in parts.items():
        out[name] = measure()
        write_results("speed_gpu", out)  # each part as soon as it is measured: device time is short
    out["update_s_paper_ethanol"] = out["update_paper_ethanol"].get("update_s")
    write_results("speed_gpu", out)
    return {"gpu": {"machine": machine(), **out}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="ensemble,chain_steps,profile,update,reference")
    parser.add_argument("--force", action="store_true", help="re-measure sections already stored")
    parser.add_argument("--gpu-budget-s", type=float, default=300, help="longest update the gpu section runs")
    args = parser.parse_args()
    path = RESULTS / "speed.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.pop("machine", None)
    sections = {
        "ensemble": lambda: ensemble_section(systems()),
        "chain_steps": lambda: chain_steps_section(systems()),
        "profile": lambda: profile_section(systems()),
        "update": lambda: update_section(systems(), results.get("chain_steps_per_s_fast")),
        "reference": lambda: reference_section(systems()),
        "gpu": lambda: gpu_section(args.gpu_budget_s),
    }
    for name in args.only.split(","):
        key = "update_fast" if name == "update" else name
        if isinstance(results.get(key), dict) and not args.force:  # "gpu" holds a note until measured
            print(f"{name}: stored, skipped (--force to re-measure)")
            continue
        results.update(sections[name]())
        results.setdefault("measured_on", {})[name] = machine()["date"]
        write_results("speed", results)
    results["gpu"] = results.get("gpu") or "no GPU machine was lent to this task; the paper-default update was not run on a GPU"
    print("wrote", write_results("speed", results))


if __name__ == "__main__":
    main()
