"""Build the GPU benchmark assets on the GPU host (no hub there): the random-weight Qwen2-0.5B-shaped model with a
Qwen2-identical tokenizer, and NuminaMath-TIR-schema data as DATASET_ID folder (train.jsonl, test.jsonl).

    python tools/gpu_prepare.py /tmp/assets      # -> /tmp/assets/model, /tmp/assets/data
"""

import os
import shutil
import sys
import time

from fastgrpo.testing import build_random_qwen2_0_5b, make_numina_like_dataset

root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/assets"
t = time.time()
model = os.path.join(root, "model")
if not os.path.isdir(model):  # built aside and renamed: a failed build (no tokenizer package) leaves no model
    shutil.rmtree(f"{model}.tmp", ignore_errors=True)
    build_random_qwen2_0_5b(f"{model}.tmp")
    os.replace(f"{model}.tmp", model)
os.makedirs(os.path.join(root, "data"), exist_ok=True)
for name, n, seed in (("train", 4000, 0), ("test", 400, 1)):
    path = os.path.join(root, "data", f"{name}.jsonl")
    if not os.path.isfile(path):  # never rewritten: a run started earlier may be reading it
        make_numina_like_dataset(f"{path}.tmp", n=n, seed=seed)
        os.replace(f"{path}.tmp", path)
print(f"assets ready in {root} ({time.time() - t:.1f} s)")
