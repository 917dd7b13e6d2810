# Types of the module CMake writes from _build_info.py.in at build time.
ACCELERATOR: str
LLAMA_CPP_BUILD: int
LLAMA_CPP_SOURCE: str
LLAMA_CPP_SHA256: str
BACKEND_DL: bool
NATIVE: bool
COMPILER: str
