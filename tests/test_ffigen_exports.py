"""ffigen reads the libraries' export tables from the files, and agrees with the dynamic loader."""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
INCLUDE_DIRS = [str(REPO / d) for d in ("vendor/llama.cpp/include", "vendor/llama.cpp/ggml/include",
                                        "vendor/llama.cpp/tools/mtmd", "csrc")]  # as in CMakeLists.txt

LIB_SOURCE = r"""
#include <stdio.h>
extern int ffx_undefined(int x);
__attribute__((visibility("hidden"))) int ffx_hidden(int x) { return x * 2; }
static int ffx_static(int x) { printf("%d\n", x); return x + 1; }
__attribute__((weak)) int ffx_weak(int x) { return x - 1; }
__attribute__((visibility("protected"))) int ffx_protected(int x) { return x * 3; }
int ffx_data = 7;
int ffx_visible(int x) { return ffx_static(x) + ffx_hidden(x) + ffx_undefined(x) + ffx_data; }
"""
LIB_NAMES = ["ffx_visible", "ffx_hidden", "ffx_static", "ffx_undefined", "ffx_weak",
             "ffx_protected", "ffx_data", "printf", "ffx_absent"]


def _load_ffigen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ffigen", REPO / "build_backend" / "ffigen.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ffigen = _load_ffigen()


CC = os.environ.get("CC") or shutil.which("cc") or ""
needs_cc = pytest.mark.skipif(not CC, reason="no C compiler (cc) to build and preprocess with")


def _compile(tmp_path: Path, *flags: str, out: str = "libffx.so") -> Path:
    src = tmp_path / "ffx.c"
    src.write_text(LIB_SOURCE)
    dst = tmp_path / out
    subprocess.run([CC, *flags, "-fPIC", "-O0", "-o", str(dst), str(src)], check=True)
    return dst


@needs_cc
def test_compiled_library_exports_only_the_visible_functions(tmp_path: Path) -> None:
    lib = _compile(tmp_path, "-shared", "-Wl,--unresolved-symbols=ignore-all")
    assert ffigen.exported(LIB_NAMES, [str(lib)]) == {"ffx_visible", "ffx_weak", "ffx_protected"}
    # The loader cannot even open it (ctypes binds now, ffx_undefined has no definition): the
    # situation of libggml-cuda on a build machine without the CUDA driver.
    with pytest.raises(OSError, match="ffx_undefined"):
        ffigen.loader_exported(LIB_NAMES, [str(lib)])
    assert not ffigen.elf_exports(str(lib)) & {"ffx_hidden", "ffx_static", "ffx_undefined", "printf"}


def _synthetic_elf(is64: bool, bo: str, symbols: list[tuple[str, int, int, int]]) -> bytes:
    """A minimal ELF file: a header and three sections (null, .dynsym, .dynstr)."""
    strtab = b"\0"
    offsets = []
    for name, *_ in symbols:
        offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    sym_fmt, hdr_fmt, shdr_fmt = ((bo + "IBBHQQ", bo + "16sHHIQQQIHHHHHH", bo + "IIQQQQIIQQ") if is64 else
                                  (bo + "IIIBBH", bo + "16sHHIIIIIHHHHHH", bo + "IIIIIIIIII"))
    syms = bytes(struct.calcsize(sym_fmt))  # the reserved null symbol
    for off, (_, info, other, shndx) in zip(offsets, symbols):
        syms += (struct.pack(sym_fmt, off, info, other, shndx, 0x1000, 16) if is64 else
                 struct.pack(sym_fmt, off, 0x1000, 16, info, other, shndx))
    hdr_size, shdr_size = struct.calcsize(hdr_fmt), struct.calcsize(shdr_fmt)
    syms_at = hdr_size
    str_at = syms_at + len(syms)
    sh_at = str_at + len(strtab)
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if bo == "<" else 2, 1]) + bytes(9)
    header = struct.pack(hdr_fmt, ident, 3, 0, 1, 0, 0, sh_at, 0, hdr_size, 0, 0, shdr_size, 3, 0)
    sections = (bytes(shdr_size)
                + struct.pack(shdr_fmt, 0, 11, 2, 0, syms_at, len(syms), 2, 1, 8, struct.calcsize(sym_fmt))
                + struct.pack(shdr_fmt, 0, 3, 2, 0, str_at, len(strtab), 0, 0, 1, 0))
    return header + syms + strtab + sections


@pytest.mark.parametrize("is64", [False, True], ids=["32bit", "64bit"])
@pytest.mark.parametrize("bo", ["<", ">"], ids=["little", "big"])
def test_synthetic_elf_classes_and_byte_orders(tmp_path: Path, is64: bool, bo: str) -> None:
    glob_func, weak_func, glob_obj, glob_notype, glob_ifunc, local_func = 0x12, 0x22, 0x11, 0x10, 0x1A, 0x02
    symbols = [("f_default", glob_func, 0, 5), ("f_weak", weak_func, 0, 5), ("f_protected", glob_func, 3, 5),
               ("f_hidden", glob_func, 2, 5), ("f_internal", glob_func, 1, 5), ("f_undef", glob_func, 0, 0),
               ("f_local", local_func, 0, 5), ("o_data", glob_obj, 0, 5), ("n_notype", glob_notype, 0, 5),
               ("i_ifunc", glob_ifunc, 0, 5), ("f_abs", glob_func, 0, 0xFFF1)]
    lib = tmp_path / "libsynthetic.so"
    lib.write_bytes(_synthetic_elf(is64, bo, symbols))
    expected = {"f_default", "f_weak", "f_protected", "n_notype", "i_ifunc", "f_abs"}
    assert ffigen.elf_exports(str(lib)) == expected


def _header_function_names() -> list[str]:
    """Every function declared in the headers ffigen binds (llama.h and what it includes, mtmd, shim)."""
    text = ffigen.own_lines(ffigen.preprocess(CC, INCLUDE_DIRS), INCLUDE_DIRS)
    ast = ffigen.c_parser.CParser().parse(ffigen.STD_STUBS + text, filename="<llamabind headers>")
    return ffigen.function_names(ast)


@needs_cc
def test_installed_libraries_file_reader_agrees_with_loader() -> None:
    import llamabind._llamabind

    pkg = Path(os.path.dirname(llamabind._llamabind.__file__))
    libs = sorted(str(p) for p in pkg.glob("lib*.so*"))
    assert libs, f"no lib*.so* installed next to {llamabind._llamabind.__file__}"
    names = _header_function_names()
    assert "llama_decode" in names and "mtmd_init_from_file" in names

    from_files = {lib: ffigen.elf_exports(lib) & set(names) for lib in libs}
    union = ffigen.exported(names, libs)
    assert union == set().union(*from_files.values())
    assert union == ffigen.loader_exported(names, libs)
    assert "llama_decode" in union
    for lib, mine in from_files.items():
        # dlsym on a handle also searches the library's dependencies (the other files here).
        theirs = ffigen.loader_exported(names, [lib])
        assert mine <= theirs, (lib, sorted(mine - theirs))
        others = set().union(*(v for k, v in from_files.items() if k != lib))
        assert theirs - mine <= others, (lib, sorted(theirs - mine - others))


@needs_cc
def test_not_a_shared_library_is_a_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "libtext.so"
    text.write_text("INPUT(-lfoo)\n")  # a linker script, as some lib*.so files are
    with pytest.raises(ValueError, match=r"libtext\.so is not a shared library"):
        ffigen.exported(["f"], [str(text)])
    empty = tmp_path / "libempty.so"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"libempty\.so is not a shared library"):
        ffigen.exported(["f"], [str(empty)])

    lib = _compile(tmp_path, "-shared", "-Wl,--unresolved-symbols=ignore-all")
    truncated = tmp_path / "libtruncated.so"
    truncated.write_bytes(lib.read_bytes()[:64])
    with pytest.raises(ValueError, match=r"libtruncated\.so is a truncated or malformed ELF file"):
        ffigen.exported(["f"], [str(truncated)])

    obj = _compile(tmp_path, "-c", out="ffx.o")  # ELF, but relocatable: no dynamic symbols
    with pytest.raises(ValueError, match=r"ffx\.o: no dynamic symbol table"):
        ffigen.exported(["f"], [str(obj)])

    with pytest.raises(SystemExit, match=r"^ffigen: cannot read the exports .*libtext\.so is not a shared"):
        includes = [arg for d in INCLUDE_DIRS for arg in ("-I", d)]
        ffigen.main(["--cc", CC, "--out", str(tmp_path / "x.c"), *includes, "--exports-from", str(text)])
    assert not (tmp_path / "x.c").exists()
