"""``python -m llamabind info``: version, llama.cpp build, accelerator, backends, devices."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="version, llama.cpp build, accelerator, devices",
                       description="What this install is: llamabind's version, the pinned llama.cpp build, "
                                   "the accelerator it was built for, and the ggml backends and devices found now.")
    p.add_argument("--json", action="store_true", help="the same as one JSON object")
    p.set_defaults(fn=run, verbose=0)


def run(args) -> int:
    import llamabind as lb

    info = lb.system_info()
    if args.json:
        print(json.dumps(info.as_dict(), indent=2))
        return 0
    print(f"llamabind {info.version}")
    print(f"llama.cpp build {info.llama_cpp_build} ({info.llama_cpp_source}, sha256 {info.llama_cpp_sha256[:12]}...)")
    print(f"accelerator: {info.accelerator} (native={info.native}, backend_dl={info.backend_dl}, {info.compiler})")
    print(f"backends: {', '.join(info.backends)}")
    for d in info.devices:
        print(f"device {d.name} [{d.type}, {d.backend}]: {d.description}; "
              f"{d.memory_free / 2**20:.0f}/{d.memory_total / 2**20:.0f} MiB free")
    print(f"system: {info.system_info}")
    return 0
