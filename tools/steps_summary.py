"""Median seconds per optimizer step and completions/s of a multi-GPU run, from fastgrpo's metrics.jsonl or a
TRL log stamped by tools/stamp.py (one `{'loss': ...}` line per step, logging_steps=1).

    python tools/steps_summary.py RUN_FILE COMPLETIONS_PER_STEP LABEL   # prints one JSON line: STEPS {...}
Step 1 is left out (warm-up); s/step is the median of the rest.
"""
import json
import statistics
import sys

path, cps, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
walls, extra = [], {}
try:
    if path.endswith(".jsonl"):
        rows = [json.loads(line) for line in open(path) if '"step_time"' in line]
        walls = [r["step_time"] for r in rows]
        for k in ("generation_time", "train_time", "weight_sync_time"):
            xs = [r[k] for r in rows[1:] if isinstance(r.get(k), (int, float))]
            if xs:
                extra[k] = round(statistics.median(xs), 3)
    else:
        stamps = [float(line.split("\t", 1)[0]) for line in open(path, errors="replace", newline="\n")
                  if "\t" in line and "'loss'" in line.split("\t", 1)[1]]
        walls = [b - a for a, b in zip(stamps, stamps[1:])]  # the first logged step has no start: dropped
        walls = [float("nan")] + walls
except (OSError, ValueError) as e:
    extra["error"] = str(e)
timed = [w for w in walls[1:] if w == w]
med = statistics.median(timed) if timed else None
print("STEPS " + json.dumps({"run": label, "steps": len(walls), "s_per_step": None if med is None else round(med, 3),
                             "completions_per_s": None if not timed else round(cps * len(timed) / sum(timed), 2),
                             "completions_per_step": cps, **extra}), flush=True)
