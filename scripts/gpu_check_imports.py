"""The import matrix of scripts/gpu-check.sh: each way of importing llamabind in its own interpreter,
with its exit status, so that one GPU run tells which condition made issue 23's CUDA wheel crash
(``import numpy, llamabind``: SIGSEGV while the extension loaded).

Variants: the import orders; the preload as it was before the fix (NVIDIA's libraries RTLD_GLOBAL
after numpy), with numpy's OpenBLAS thread pool and without (OPENBLAS_NUM_THREADS=1); the driver
loaded before numpy starts those threads; no visible GPU. Each crash leaves its stderr (faulthandler,
and LD_DEBUG=libs: the last library the loader opened) in OUT/import-<name>.log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

OLD_PRELOAD = """
import ctypes, glob, os, sys
for so in ("libcudart.so.*", "libcublasLt.so.*", "libcublas.so.*"):
    found = sorted(p for e in sys.path for p in glob.glob(os.path.join(e, "nvidia", "cu*", "lib", so)))
    if found:
        ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
"""
DRIVER_FIRST = "import ctypes; ctypes.CDLL('libcuda.so.1')\n"
PROBE = "import llamabind as lb; print(sorted({d.backend for d in lb.system.devices()}))"

CASES = [
    ("llamabind-first", "import llamabind, numpy\n" + PROBE, {}),
    ("numpy-first", "import numpy, llamabind\n" + PROBE, {}),
    ("numpy-first, 16 OpenBLAS threads", "import numpy, llamabind\n" + PROBE, {"OPENBLAS_NUM_THREADS": "16"}),
    ("torch-first", "import torch, llamabind\n" + PROBE, {}),
    ("numpy-first, no visible GPU", "import numpy, llamabind\n" + PROBE, {"CUDA_VISIBLE_DEVICES": ""}),
    ("old preload (RTLD_GLOBAL) after numpy", "import numpy\n" + OLD_PRELOAD + PROBE, {}),
    ("old preload after numpy, OPENBLAS_NUM_THREADS=1", "import numpy\n" + OLD_PRELOAD + PROBE,
     {"OPENBLAS_NUM_THREADS": "1"}),
    ("old preload, driver loaded before numpy", DRIVER_FIRST + "import numpy\n" + OLD_PRELOAD + PROBE, {}),
    ("old preload before numpy", OLD_PRELOAD + "import numpy\n" + PROBE, {}),
]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    print("| import | exit | devices / last lines |\n| --- | ---: | --- |")
    for i, (name, code, env) in enumerate(CASES):
        if name.startswith("torch") and subprocess.run([sys.executable, "-c", "import torch"],
                                                       capture_output=True).returncode != 0:
            print(f"| {name} | - | torch is not installed |")
            continue
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                           timeout=120, env={**os.environ, **env, "LD_DEBUG": "libs"})
        log = out / f"import-{i}.log"
        log.write_text(f"{name}\n{code}\n{env}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
        own = [line for line in r.stderr.splitlines() if line.strip() and not re.match(r"^\s*\d+:\s", line)]
        inits = [line.split("calling init:")[1].strip() for line in r.stderr.splitlines() if "calling init:" in line]
        if r.returncode == 0:
            tail = r.stdout.strip().splitlines()[-1:]
        elif r.returncode < 0:  # a signal: the library whose initialiser ran last, and faulthandler's first line
            tail = [f"last init {inits[-1] if inits else '?'}"] + [line for line in own if "Fatal" in line][:1]
        else:
            tail = own[-1:]
        print(f"| {name} | {r.returncode} | {' / '.join(tail)} ({log.name}) |")


if __name__ == "__main__":
    main()
