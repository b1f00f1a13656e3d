"""Copy stdin to stdout, each line prefixed with the wall time (seconds since the epoch) and a tab.

Used to time runs whose own logs carry no per-step wall time (TRL prints one `{'loss': ...}` dict per logged step):
    python -u script.py 2>&1 | python tools/stamp.py > run.log
"""
import sys
import time

for line in sys.stdin:
    sys.stdout.write(f"{time.time():.3f}\t{line}")
    sys.stdout.flush()
