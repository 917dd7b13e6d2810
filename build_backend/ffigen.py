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
import mmap
import os
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import cffi
from pycparser import c_ast, c_generator, c_parser

HEADERS = ("llama.h", "mtmd.h", "mtmd-helper.h", "llamabind_shim.h", "llamabind_chat.h", "llamabind_fit.h")

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
/* Abort callback reading two int flags (int *[2]: the context's own, and a Cancel's or NULL):
   cancellation with no Python call per graph node. */
static bool _llamabind_flag_abort(void * flags) {
    int ** f = (int **) flags;
    return f != NULL && ((f[0] != NULL && *(volatile int *) f[0] != 0) ||
                         (f[1] != NULL && *(volatile int *) f[1] != 0));
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


# ELF constants (see the System V ABI, "Object Files"; elf.h).
_SHT_DYNSYM = 11
_SHT_GNU_VERSYM = 0x6FFFFFFF
_SHN_UNDEF = 0
_EXPORTED_BINDS = (1, 2)  # STB_GLOBAL, STB_WEAK
_EXPORTED_TYPES = (0, 2, 10)  # STT_NOTYPE, STT_FUNC, STT_GNU_IFUNC
_EXPORTED_VISIBILITIES = (0, 3)  # STV_DEFAULT, STV_PROTECTED
_VERSYM_HIDDEN = 0x8000

# Magic bytes of the formats read through the dynamic loader instead (Mach-O, fat Mach-O, PE).
_LOADER_MAGICS = (b"\xfe\xed\xfa\xce", b"\xce\xfa\xed\xfe", b"\xfe\xed\xfa\xcf", b"\xcf\xfa\xed\xfe",
                  b"\xca\xfe\xba\xbe", b"\xca\xfe\xba\xbf", b"MZ")


def elf_exports(path: str) -> set[str]:
    """The function names an ELF shared library exports, read from its ``.dynsym`` table.

    Read from the file, not through the dynamic loader: a library whose dependencies are
    missing on the build machine (libggml-cuda without the CUDA driver) cannot be loaded.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise ValueError(f"{path} is not an ELF file")
        # Mapped, not read: only the headers and the tables are paged in (CUDA libraries are big).
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return _elf_dynsym_exports(data)
            except (struct.error, IndexError) as e:
                raise ValueError(f"{path} is a truncated or malformed ELF file ({e})") from None
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None


def _elf_dynsym_exports(data: mmap.mmap) -> set[str]:
    """Parse the section headers, the dynamic symbol table, its string table and versions."""
    ei_class, ei_data = data[4], data[5]
    if ei_class not in (1, 2) or ei_data not in (1, 2):
        raise ValueError(f"unknown ELF class {ei_class} or data encoding {ei_data}")
    bo = "<" if ei_data == 1 else ">"
    is64 = ei_class == 2
    if is64:
        shoff, = struct.unpack_from(bo + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(bo + "HH", data, 0x3A)
        shdr = bo + "IIQQQQIIQQ"  # name type flags addr offset size link info addralign entsize
        sym, sym_size = bo + "IBBHQQ", 24  # name info other shndx value size
    else:
        shoff, = struct.unpack_from(bo + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(bo + "HH", data, 0x2E)
        shdr = bo + "IIIIIIIIII"
        sym, sym_size = bo + "IIIBBH", 16  # name value size info other shndx
    if shoff == 0:
        raise ValueError("no section headers, so no dynamic symbol table to read")
    if shnum == 0:  # more than 0xff00 sections: the real count is in section 0's sh_size
        shnum = struct.unpack_from(shdr, data, shoff)[5]
    sections = [struct.unpack_from(shdr, data, shoff + i * shentsize) for i in range(shnum)]
    dynsym = next((s for s in sections if s[1] == _SHT_DYNSYM), None)
    if dynsym is None:
        raise ValueError("no dynamic symbol table (.dynsym); not a shared library")
    versym = next((s for s in sections if s[1] == _SHT_GNU_VERSYM), None)
    strtab = sections[dynsym[6]]
    strings = data[strtab[4]:strtab[4] + strtab[5]]
    entsize = dynsym[9] or sym_size
    names: set[str] = set()
    for i in range(1, dynsym[5] // entsize):  # entry 0 is the reserved null symbol
        fields = struct.unpack_from(sym, data, dynsym[4] + i * entsize)
        if is64:
            st_name, st_info, st_other, st_shndx = fields[:4]
        else:
            st_name, st_info, st_other, st_shndx = fields[0], fields[3], fields[4], fields[5]
        if (st_shndx == _SHN_UNDEF or st_info >> 4 not in _EXPORTED_BINDS
                or st_info & 0xF not in _EXPORTED_TYPES or st_other & 3 not in _EXPORTED_VISIBILITIES):
            continue
        # A non-default symbol version (foo@V1 next to foo@@V2) is not what dlsym finds.
        if versym is not None and struct.unpack_from(bo + "H", data, versym[4] + 2 * i)[0] & _VERSYM_HIDDEN:
            continue
        end = strings.find(b"\0", st_name)
        if end < 0:
            raise ValueError("a symbol name runs past the end of the string table")
        names.add(strings[st_name:end].decode("utf-8", "replace"))
    return names


def loader_exported(names: list[str], libraries: list[str]) -> set[str]:
    """The subset of ``names`` that the dynamic loader finds in ``libraries`` (loads them all)."""
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


def exported(names: list[str], libraries: list[str]) -> set[str]:
    """The subset of ``names`` that one of the built ``libraries`` exports.

    ELF files are read directly (see elf_exports); Mach-O and PE files, which this module
    does not parse, are loaded with ctypes instead. Anything else is an error.
    """
    found: set[str] = set()
    loaded: list[str] = []
    for path in libraries:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"\x7fELF":
            found |= elf_exports(path)
        elif magic.startswith(_LOADER_MAGICS):
            loaded.append(path)
        else:
            raise ValueError(f"{path} is not a shared library (not ELF, Mach-O or PE)")
    found &= set(names)
    if loaded:
        found |= loader_exported(names, loaded)
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
    try:
        cdef, dropped = build_cdef(text, args.exports_from)
    except (OSError, ValueError) as e:
        raise SystemExit(f"ffigen: cannot read the exports of the built libraries: {e}") from None
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
