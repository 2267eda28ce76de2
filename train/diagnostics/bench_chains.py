"""Wall time of a config's NUTS chains, sequential (`local`) against one process per chain
(`processes`), alternated `--reps` times, and whether the draws are bitwise equal:

    nice -n 10 .venv/bin/python -m train.diagnostics.bench_chains train/configs/digits.toml --chains 2 --warmup 100 --draws 50

The data and MAP stages run first (not timed); each timed run includes its JIT compilation (and,
for processes, starting the interpreters), as in a build. `--single-thread-workers` adds a third
variant, processes whose XLA runs on one thread each (XLA_FLAGS set for the spawned workers)."""

import argparse
import json
import os
import time

import numpy as np

from .. import config, data, map as map_stage, posterior


ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"  # XLA_FLAGS


def chain_arguments(prog, doc, reps):
    """The arguments both chain benchmarks take (config, chains, warm-up, draws, reps, json)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--json", default=None, help="write the results here")
    return ap


def chain_spec(args):
    """The config shortened to the arguments' chains and iterations; its data and MAP stages run
    (not timed) and give the spec every executor runs."""
    cfg = config.load(args.config)
    cfg["posterior"].update(chains=args.chains, warmup=args.warmup, draws=args.draws)
    d = data.load(cfg, os.path.dirname(os.path.abspath(args.config)))
    return posterior.chain_spec(cfg, d, map_stage.run(cfg, d))


def main(argv=None):
    ap = chain_arguments("python -m train.diagnostics.bench_chains", __doc__, reps=1)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--single-thread-workers", action="store_true",
                    help="also time processes whose XLA runs on one thread each (XLA_FLAGS in the workers)")
    args = ap.parse_args(argv)
    spec = chain_spec(args)
    res = {"config": args.config, "chains": args.chains, "warmup": args.warmup, "draws": args.draws,
           "cores": os.cpu_count(), "local": [], "processes": [], "load1": [], "identical": True}
    variants = ["local", "processes"] + (["processes_1thread"] if args.single_thread_workers else [])
    ref = None
    for _ in range(args.reps):
        for ex in variants:
            res.setdefault(ex, [])
            res["load1"].append(round(os.getloadavg()[0], 1))
            t0 = time.time()
            saved = os.environ.get("XLA_FLAGS")
            if ex == "processes_1thread":  # read by each spawned worker's jax at import; this process is set up
                os.environ["XLA_FLAGS"] = ONE_THREAD
            try:
                draws, _ = posterior.run_chains(spec, args.chains, ex.split("_")[0], workers=args.workers)
            finally:
                os.environ.pop("XLA_FLAGS", None)
                if saved is not None:
                    os.environ["XLA_FLAGS"] = saved
            res[ex].append(round(time.time() - t0, 1))
            draws = np.stack(draws)
            ref = draws if ref is None else ref
            res["identical"] &= bool(np.array_equal(ref, draws))
            print(f"{ex}: {res[ex][-1]} s (1-min load average {res['load1'][-1]})", flush=True)
    res["speedup"] = [round(a / b, 2) for a, b in zip(res["local"], res["processes"])]
    if args.single_thread_workers:
        res["speedup_1thread"] = [round(a / b, 2) for a, b in zip(res["local"], res["processes_1thread"])]
    print(json.dumps(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
