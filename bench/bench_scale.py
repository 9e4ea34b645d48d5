"""Peak memory at 100 and 1,000 clips (it should stay flat), and a second `run` over 1,000 processed clips
(it should do no work and finish in under 10 s). Each measurement runs in a fresh process so ru_maxrss is its own.
Usage: python bench/bench_scale.py [--large N]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from affectprep.pipeline.demo import make_demo_dataset

from common import project_for

MEASURE = r"""
import json, resource, sys, time
from affectprep.config import load_project
from affectprep.pipeline.dag import run_pipeline
start = time.perf_counter()
report = run_pipeline(load_project(sys.argv[1]), "faces", workers=2, progress=False)
seconds = time.perf_counter() - start
mib = lambda kib: kib / 1024
print(json.dumps({"seconds": seconds, "client_mib": mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
                  "worker_mib": mib(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss),
                  "new": sum(s.ok + s.failed for s in report.stages)}))
"""


def measure(config: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(config)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        results = {}
        for n in (args.small, args.large):
            root = make_demo_dataset(work / f"DFEW{n}", clips=n, seed=0)
            project = project_for(root, work / f"run{n}")
            results[n] = measure(project.path)
            print(f"{n:5d} clips: {results[n]['seconds']:7.1f} s, peak RSS client {results[n]['client_mib']:.0f} MiB, "
                  f"largest worker {results[n]['worker_mib']:.0f} MiB")
        rerun = measure(work / f"run{args.large}" / "affectprep.toml")
        print(f"second run over {args.large} processed clips: {rerun['seconds']:.2f} s, {rerun['new']} samples "
              f"processed (target: 0 samples, < 10 s)")
        small, large = results[args.small], results[args.large]
        print(f"peak memory ratio {args.large} vs {args.small} clips: client "
              f"{large['client_mib'] / small['client_mib']:.2f}x, worker {large['worker_mib'] / small['worker_mib']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
