"""Twins of the strategy classes for the standalone ``pytorch_lightning`` package, the algorithm code written once.

``lsgd_lightning.LSGDStrategy`` is a ``lightning.pytorch`` strategy; ``lsgd_lightning.pytorch_lightning.LSGDStrategy``
is the same class for ``pytorch_lightning.Trainer`` (and every name, e.g. ``"lsgd"``, is registered with both).

``pytorch_lightning`` is ``lightning.pytorch``'s source with ``lightning.pytorch`` -> ``pytorch_lightning`` and
``lightning.fabric`` -> ``lightning_fabric`` rewritten (that is how Lightning builds it), with its own classes, enums,
exceptions and registry. The twins are made the same way: ``<pkg>.pytorch_lightning.<mod>`` is
``<pkg>/strategies/<mod>.py`` executed with those two rewrites, so every Lightning symbol the algorithm touches (base
class, ``TrainerFn``, ``SIGTERMException``, plugin types in annotations, the registry) is the ``pytorch_lightning``
one. A module that does not mention Lightning is not copied: its twin *is* the original module (one copy of its
state, e.g. counters that must agree across ranks). Twin modules are real modules (picklable for the spawn launcher,
addressable by class path from LightningCLI and Hydra); tracebacks and ``inspect`` point at the original file and lines.

``install()`` (called by ``import <pkg>``) builds them as soon as ``pytorch_lightning`` is imported, before or after
this package, without importing ``pytorch_lightning`` itself (importing it costs about 0.3 s of CPU).
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import pkgutil
import re
import sys
import warnings
from types import ModuleType
from typing import Any

_PACKAGE = __name__.rpartition(".")[0]
SOURCE = f"{_PACKAGE}.strategies"  # written against lightning.pytorch
TWIN = f"{_PACKAGE}.pytorch_lightning"  # the same code against pytorch_lightning
SUPPORTED = ((2, 4), (2, 7))  # pytorch_lightning versions the twins are built for: [2.4, 2.7)

# Lightning's own mirror rule (.actions/assistant.py `_replace_imports`), anchored so that names that merely contain
# the text (``lightning.pytorch_foo``, ``x.lightning.pytorch``, ``lsgd_lightning.pytorch_lightning``) are left alone.
_REWRITES = (
    (re.compile(r"(?<![\w.])lightning\.pytorch\b"), "pytorch_lightning"),
    (re.compile(r"(?<![\w.])lightning\.fabric\b"), "lightning_fabric"),
)


def _source_name(twin_name: str) -> str:
    return SOURCE + twin_name[len(TWIN) :]


class _TwinFinder(importlib.abc.MetaPathFinder):
    """Finds ``<pkg>.pytorch_lightning[.<mod>]``: the mirror of ``<pkg>.strategies[.<mod>]``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TWIN and not fullname.startswith(TWIN + "."):
            return None
        source_spec = importlib.util.find_spec(_source_name(fullname))
        if source_spec is None or source_spec.origin is None:
            return None
        is_package = source_spec.submodule_search_locations is not None
        spec = importlib.util.spec_from_loader(
            fullname, _TwinLoader(source_spec), origin=source_spec.origin, is_package=is_package
        )
        assert spec is not None
        spec.has_location = True  # __file__ = the original file: inspect.getsource, tracebacks, coverage
        return spec


class _TwinLoader(importlib.abc.Loader):
    def __init__(self, source_spec: importlib.machinery.ModuleSpec) -> None:
        self.source_spec = source_spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        name, origin = self.source_spec.name, self.source_spec.origin
        if not _needs_mirror(name):
            # Lightning-free: the twin is the original module itself (importlib re-reads sys.modules after exec).
            sys.modules[module.__name__] = importlib.import_module(name)
            return
        source = _source(name)
        for pattern, replacement in _REWRITES:
            source = pattern.sub(replacement, source)
        unified = [n for n in _imported_names(source, name) if n == "lightning" or n.startswith("lightning.")]
        if unified:
            raise ImportError(
                f"{origin}: `{unified[0]}` cannot be mirrored for pytorch_lightning; strategy modules may import "
                "from lightning.pytorch and lightning.fabric only."
            )
        exec(compile(source, origin, "exec", dont_inherit=True), module.__dict__)


def _source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None
    return spec.loader.get_source(name)  # type: ignore[attr-defined]


# `from .x import (a, b)` / `import a.b as c, d`; a regex, not ast: ~10x cheaper, and a false hit only copies a module.
_IMPORT = re.compile(
    r"^[ \t]*(?:from[ \t]+(\.*)([\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]*)|import[ \t]+([^\n#]*))", re.M
)


def _imported_names(source: str, name: str) -> list[str]:
    """Absolute names that module ``name`` imports (``from .m import x`` gives ``pkg.m`` and ``pkg.m.x``)."""
    package = name if name in _source_packages() else name.rpartition(".")[0]
    names: list[str] = []
    for dots, module, imported, plain in _IMPORT.findall(source):
        if plain:
            names += [part.split()[0] for part in plain.split(",") if part.strip()]
            continue
        base = importlib.util.resolve_name(dots + module, package) if dots else module
        names.append(base)
        names += [f"{base}.{part.split()[0]}" for part in imported.strip("()").split(",") if part.strip()]
    return names


_mirror_needed: dict[str, bool] = {}


def _needs_mirror(name: str) -> bool:
    """Whether module ``name`` (under SOURCE) imports Lightning, directly or through another module under SOURCE.

    Only such modules are copied; the others are shared, so a Lightning-free helper that imports a strategy class
    (for an isinstance check, say) is copied too and sees the twin class.
    """
    if name in _mirror_needed:
        return _mirror_needed[name]
    _mirror_needed[name] = False  # import cycles: assume no until shown otherwise
    try:
        needed = any(
            target == "lightning"
            or target.startswith("lightning.")
            or (target != name and target in _source_modules() and _needs_mirror(target))
            for target in _imported_names(_source(name), name)
        )
    except BaseException:
        del _mirror_needed[name]
        raise
    _mirror_needed[name] = needed
    return needed


@functools.cache
def _source_modules() -> frozenset[str]:
    package = importlib.import_module(SOURCE)
    walked = pkgutil.walk_packages(package.__path__, SOURCE + ".")
    return frozenset([SOURCE, *(info.name for info in walked)])


@functools.cache
def _source_packages() -> frozenset[str]:
    package = importlib.import_module(SOURCE)
    walked = pkgutil.walk_packages(package.__path__, SOURCE + ".")
    return frozenset([SOURCE, *(info.name for info in walked if info.ispkg)])


class _BuildTwinsAfterImport(importlib.abc.MetaPathFinder):
    """Post-import hook: once ``pytorch_lightning`` has been executed, build and register the twins."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "pytorch_lightning":
            return None
        later = sys.meta_path[sys.meta_path.index(self) + 1 :] if self in sys.meta_path else []
        for finder in later:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and not isinstance(spec.loader, _ThenBuildTwins):
            spec.loader = _ThenBuildTwins(spec.loader, self)
        return spec


class _ThenBuildTwins(importlib.abc.Loader):
    def __init__(self, loader: Any, hook: _BuildTwinsAfterImport) -> None:
        self._loader = loader
        self._hook = hook

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        if self._hook in sys.meta_path:
            sys.meta_path.remove(self._hook)
        module.__loader__ = self._loader  # leave no trace on pytorch_lightning
        module.__spec__.loader = self._loader
        build_twins()


def build_twins() -> ModuleType | None:
    """Import ``<pkg>.pytorch_lightning`` (registers the names in pytorch_lightning's StrategyRegistry)."""
    import pytorch_lightning

    version = tuple(int(part) for part in re.findall(r"\d+", pytorch_lightning.__version__)[:2])
    if not (SUPPORTED[0] <= version < SUPPORTED[1]):
        warnings.warn(
            f"{_PACKAGE}: pytorch_lightning {pytorch_lightning.__version__} is outside the supported range "
            f"{'.'.join(map(str, SUPPORTED[0]))}-{'.'.join(map(str, SUPPORTED[1]))} (exclusive); its strategy names "
            f"are not registered. Use lightning.pytorch, or install a matching pytorch-lightning.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    try:
        return importlib.import_module(TWIN)
    except Exception as error:  # never break the user's `import pytorch_lightning`
        message = f"{_PACKAGE}: building the pytorch_lightning twins failed: {error!r}"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return None


def describe(strategy: object) -> str:
    """A strategy's ``repr``: which Trainer it is for and where its twin is, since Lightning's error for a strategy
    of the other namespace ("must be ... an instance of pytorch_lightning.strategies.Strategy") shows only this."""
    cls = type(strategy)
    ddp = next((base for base in cls.__mro__ if base.__name__ == "DDPStrategy"), cls)
    mine = "pytorch_lightning" if ddp.__module__.startswith("pytorch_lightning") else "lightning.pytorch"
    other, home = ("lightning.pytorch", _PACKAGE) if mine == "pytorch_lightning" else ("pytorch_lightning", TWIN)
    return f"{cls.__name__}(for {mine}.Trainer; for {other}.Trainer use {home}.{cls.__name__})"


def install() -> None:
    """Called once by ``import <pkg>``: make the twins importable and build them when pytorch_lightning is there."""
    if not any(isinstance(finder, _TwinFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TwinFinder())
    if "pytorch_lightning" in sys.modules:
        build_twins()
    elif not any(isinstance(finder, _BuildTwinsAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BuildTwinsAfterImport())
