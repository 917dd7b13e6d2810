"""Generate the cffi (API mode) C source for ``llamabind._llamabind`` from the vendored headers.

Run by CMake after libllama, ggml and libmtmd are built. The C declarations are
never written by hand: the public headers are preprocessed by the C compiler, the
declarations that come from the vendored headers are kept (system headers are
dropped: cffi knows the standard types), and the result is cleaned for cffi:

* array sizes that use ``sizeof`` become ``[...]`` (cffi asks the compiler);
* repeated identical typedefs are dropped;
* functions that no built library exports are dropped (they would fail to link).

Structs keep all their fields, so cffi's generated code makes the C compiler check
every field offset and size against the real headers at build time.

Usage: ffigen.py --cc CC --out FILE.c --exports-from LIB [LIB ...] -I DIR [-I DIR ...]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import cffi
from pycparser import c_ast, c_generator, c_parser

HEADERS = ("llama.h", "mtmd.h", "mtmd-helper.h", "llamabind_shim.h")

# Callbacks that call into Python; their C names are referenced from Python code.
PYTHON_CALLBACKS = """
extern "Python" void _llamabind_log(enum ggml_log_level level, const char * text, void * user_data);
extern "Python" bool _llamabind_abort(void * data);
extern "Python" bool _llamabind_progress(float progress, void * user_data);
extern "Python" bool _llamabind_eval(struct ggml_tensor * t, bool ask, void * user_data);
"""

# Small C helpers for hot paths that must not enter Python.
C_HELPERS_CDEF = """
bool _llamabind_flag_abort(void * flag);
int32_t _llamabind_native_loop(struct llama_context * ctx, struct llama_sampler * smpl, int32_t n, llama_token * out);
"""
C_HELPERS = """
/* Abort callback reading an int flag: cancellation with no Python call per graph node. */
static bool _llamabind_flag_abort(void * flag) {
    return flag != NULL && *(volatile int *) flag != 0;
}

/* The reference native decode loop for measuring llamabind's per-token overhead: the same
   calls as llamabind.generate (sample, token_to_piece, decode), n times, in plain C. */
static int32_t _llamabind_native_loop(struct llama_context * ctx, struct llama_sampler * smpl,
                                      int32_t n, llama_token * out) {
    const struct llama_vocab * vocab = llama_model_get_vocab(llama_get_model(ctx));
    char piece[256];
    for (int32_t i = 0; i < n; i++) {
        out[i] = llama_sampler_sample(smpl, ctx, -1);
        if (llama_token_to_piece(vocab, out[i], piece, sizeof(piece), 0, false) < 0) {
            return -1;
        }
        int32_t rc = llama_decode(ctx, llama_batch_get_one(&out[i], 1));
        if (rc != 0) {
            return -100 - rc;
        }
    }
    return n;
}
"""

# Included by the generated C; the same headers that were parsed.
SOURCE_PRELUDE = "\n".join(f'#include "{h}"' for h in HEADERS) + "\n" + C_HELPERS

ELLIPSIS = "__llamabind_ellipsis__"

# Standard types that cffi knows but pycparser must be told about; not emitted.
STD_TYPES = ("size_t", "ptrdiff_t", "intptr_t", "uintptr_t", "FILE", "int8_t", "int16_t",
             "int32_t", "int64_t", "uint8_t", "uint16_t", "uint32_t", "uint64_t")
STD_STUBS = "".join(f"typedef int {t};\n" for t in STD_TYPES)


def preprocess(cc: str, include_dirs: list[str]) -> str:
    """Run the C preprocessor over the public headers; keep line markers to know origins."""
    src = "".join(f'#include "{h}"\n' for h in HEADERS)
    cmd = shlex.split(cc) + ["-E", "-x", "c", "-std=c11", "-D__attribute__(x)=",
                             "-D__declspec(x)=", "-D_Noreturn=", "-DLLAMA_SHARED", "-DGGML_SHARED", "-"]
    for d in include_dirs:
        cmd += ["-I", d]
    proc = subprocess.run(cmd, input=src, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ffigen: preprocessing failed:\n{proc.stderr}")
    return proc.stdout


def own_lines(text: str, include_dirs: list[str]) -> str:
    """Keep only the lines that come from headers under ``include_dirs`` (not system headers)."""
    roots = tuple(str(Path(d).resolve()) + os.sep for d in include_dirs)
    keep = False
    out = []
    for line in text.splitlines():
        m = re.match(r'#\s*\d+\s+"([^"]+)"', line)
        if m:
            path = m.group(1)
            keep = not path.startswith("<") and str(Path(path).resolve()).startswith(roots)
            continue
        if keep and line.strip():
            out.append(line)
    return "\n".join(out) + "\n"


class _SizeofToEllipsis(c_ast.NodeVisitor):
    """Replace array dimensions that use sizeof (cffi cannot evaluate them) with a marker."""

    def visit_ArrayDecl(self, node: c_ast.ArrayDecl) -> None:
        if node.dim is not None and "sizeof" in c_generator.CGenerator().visit(node.dim):
            node.dim = c_ast.ID(ELLIPSIS)
        self.generic_visit(node)


def _decl_name(node: c_ast.Node) -> str | None:
    return getattr(node, "name", None)


def function_names(ast: c_ast.FileAST) -> list[str]:
    return [n.name for n in ast.ext if isinstance(n, c_ast.Decl) and isinstance(n.type, c_ast.FuncDecl)]


def exported(names: list[str], libraries: list[str]) -> set[str]:
    """The subset of ``names`` that one of the built ``libraries`` exports."""
    mode = getattr(ctypes, "RTLD_GLOBAL", 0)
    libs = [ctypes.CDLL(os.path.abspath(p), mode=mode) for p in libraries]
    found = set()
    for name in names:
        for lib in libs:
            try:
                getattr(lib, name)
            except AttributeError:
                continue
            found.add(name)
            break
    return found


def build_cdef(text: str, libraries: list[str]) -> tuple[str, list[str]]:
    """Clean the preprocessed declarations; return (cdef, dropped function names)."""
    ast = c_parser.CParser().parse(STD_STUBS + text, filename="<llamabind headers>")
    del ast.ext[:len(STD_TYPES)]
    _SizeofToEllipsis().visit(ast)
    names = function_names(ast)
    have = exported(names, libraries)
    gen = c_generator.CGenerator()
    seen: set[str] = set()
    dropped: list[str] = []
    lines: list[str] = []
    for node in ast.ext:
        if isinstance(node, c_ast.Decl) and isinstance(node.type, c_ast.FuncDecl) and node.name not in have:
            dropped.append(node.name)
            continue
        code = gen.visit(node) + ";"
        if isinstance(node, c_ast.Typedef) and code in seen:
            continue
        seen.add(code)
        lines.append(code)
    cdef = "\n".join(lines).replace(f"[{ELLIPSIS}]", "[...]")
    return cdef + "\n", dropped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="generate llamabind's cffi C source")
    ap.add_argument("--cc", required=True, help="the C compiler command (used as a preprocessor)")
    ap.add_argument("--out", required=True, type=Path, help="C file to write")
    ap.add_argument("--cdef-out", type=Path, help="also write the cdef text here (for inspection)")
    ap.add_argument("-I", dest="include", action="append", default=[], help="header directory")
    ap.add_argument("--exports-from", nargs="+", required=True, help="built shared libraries")
    args = ap.parse_args(argv)

    text = own_lines(preprocess(args.cc, args.include), args.include)
    cdef, dropped = build_cdef(text, args.exports_from)
    for name in dropped:
        print(f"ffigen: {name} is declared but no built library exports it; not bound", file=sys.stderr)

    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.cdef(PYTHON_CALLBACKS)
    ffi.cdef(C_HELPERS_CDEF)
    ffi.set_source("llamabind._llamabind", SOURCE_PRELUDE)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ffi.emit_c_code(str(args.out))
    if args.cdef_out:
        args.cdef_out.write_text(cdef)
    return 0


if __name__ == "__main__":
    sys.exit(main())
