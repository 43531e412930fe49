"""Name -> factory registries for models and losses, with each entry's defaults and metadata.

Each model and loss is registered under the name of its YAML file in ``configs/``, so the
same word selects it on the command line (``model=vxm1``) and in Python
(``regkit.create_model("vxm1")``).

One rule for options: an entry's options are the keyword arguments of what it builds, and every
one of them can be overridden by keyword. Their defaults live in one place each: a class's
signature (followed through ``**kwargs`` to its base classes) or, for a variant, the
``defaults=`` of its registration (``@MODELS.register(defaults=dict(start_channels=16))``).
:meth:`Registry.options` collects them, and a config says ``key: ${regkit.default:}`` to take
the code's default instead of repeating the number (see :func:`config_default`).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from omegaconf import OmegaConf

from regkit.errors import InputError, unknown_choice_message

_NO_DEFAULT = inspect.Parameter.empty


def keyword_options(obj: Callable[..., Any]) -> Tuple[Dict[str, Any], bool]:
    """``({name: default}, closed)``: the keyword options of a class or function.

    ``**kwargs`` is followed where regkit forwards it: a function's into the class named by its
    return annotation, a class's ``__init__`` into the next ``__init__`` of its bases (subclass
    defaults win). The walk stops at an ``__init__`` without ``**kwargs`` (``closed`` = True: no
    other option exists) or at ``object`` / a torch class (``nn.Module.__init__`` takes no
    options). A required option's default is ``inspect.Parameter.empty``. ``closed`` is False
    when ``**kwargs`` leads somewhere this cannot follow (e.g. an unannotated function).
    """
    options: Dict[str, Any] = {}

    def take(fn) -> bool:  # adds fn's keyword parameters; True if it forwards **kwargs
        forwards = False
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                options.setdefault(p.name, p.default)
        return forwards

    if not inspect.isclass(obj):
        if not take(obj):
            return options, True
        try:
            obj = typing.get_type_hints(obj).get("return")
        except Exception:  # an annotation that cannot be evaluated: nothing more is known
            obj = None
        if not inspect.isclass(obj):
            return options, False
    for klass in obj.__mro__:
        if klass is object or klass.__module__.split(".")[0] == "torch":
            return options, True
        if "__init__" in vars(klass) and not take(klass.__init__):
            return options, True
    return options, True


@dataclass(frozen=True)
class Entry:
    """One registration: the recording factory, its own defaults and its metadata."""

    name: str
    factory: Callable[..., Any]
    builds: Callable[..., Any]  # the registered function or class itself
    defaults: Dict[str, Any] = field(default_factory=dict)
    info: Any = None


class Registry:
    """A case-sensitive map from names to factories.

    Registering a name twice raises; looking up an unknown name raises ``ValueError`` listing
    the valid names and the closest match, and so does an option the entry does not have.
    Factories registered here record how they were called on the object they return
    (``obj.regkit_spec = {"name": ..., "kwargs": ...}``, the overrides only) so a checkpoint
    can rebuild the object from plain data, through this registry only.

    Args:
        kind: what the entries are ("model", "loss"), for messages.
        build: ``build(fn, kwargs)``, if given, calls every registered factory (a hook for
            options that all entries share, such as the models' ``cascades``).
        shared_options: those shared options and their defaults (what ``build`` consumes).
        info_type: if given, every registration must pass ``info=`` of this type (the models'
            :class:`~regkit.models.registry.ModelInfo`), so no entry lacks its metadata.
    """

    def __init__(self, kind: str, build: Optional[Callable[[Callable[..., Any], Dict[str, Any]], Any]] = None,
                 shared_options: Optional[Dict[str, Any]] = None, info_type: Optional[type] = None) -> None:
        self.kind = kind
        self._build = build
        self.shared_options = dict(shared_options or {})
        self.info_type = info_type
        self._entries: Dict[str, Entry] = {}

    def register(self, obj: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None,
                 defaults: Optional[Dict[str, Any]] = None, info: Any = None):
        """Decorator: ``@REG.register``, or ``@REG.register(name=..., defaults=..., info=...)``.

        ``defaults`` are keyword arguments passed to ``obj`` unless the caller gives them (a
        variant's defining numbers). A function is replaced by the recording factory, which is
        what configs' ``_target_`` names; a class stays the class (configs name it directly)
        and the registry builds it through its own recording factory.
        """
        if obj is None:
            return functools.partial(self.register, name=name, defaults=defaults, info=info)
        key = name or obj.__name__
        if key in self._entries:
            old = self._entries[key].builds
            raise ValueError(
                f"{self.kind} '{key}' is already registered by {old.__module__}.{old.__qualname__}; "
                f"cannot register {obj.__module__}.{obj.__qualname__} under the same name."
            )
        if self.info_type is not None and not isinstance(info, self.info_type):
            raise TypeError(f"{self.kind} '{key}' must be registered with info={self.info_type.__name__}(...), "
                            f"got {info!r}")
        own = dict(defaults or {})

        def factory(*args, **kwargs):
            if args:  # positional arguments cannot be recorded by name (nor checked)
                return obj(*args, **{**own, **kwargs})
            self._check_options(key, kwargs)
            call = {**own, **kwargs}
            built = obj(**call) if self._build is None else self._build(obj, call)
            try:
                built.regkit_spec = {"name": key, "kwargs": dict(kwargs)}
            except AttributeError:  # objects without __dict__
                pass
            return built

        if inspect.isclass(obj):
            factory.__name__ = factory.__qualname__ = key
            factory.__doc__ = obj.__doc__
        else:
            functools.update_wrapper(factory, obj)
        factory.registry, factory.registry_name = self, key
        self._entries[key] = Entry(key, factory, obj, own, info)
        return obj if inspect.isclass(obj) else factory

    # -- look-ups -------------------------------------------------------------------------------
    def entry(self, name: str) -> Entry:
        if not isinstance(name, str) or name not in self._entries:
            raise InputError(unknown_choice_message(self.kind, name, self.names()))
        return self._entries[name]

    def get(self, name: str) -> Callable[..., Any]:
        return self.entry(name).factory

    def create(self, name: str, **overrides: Any) -> Any:
        return self.get(name)(**overrides)

    def names(self) -> List[str]:
        return sorted(self._entries)

    def info(self, name: str) -> Any:
        """The metadata the entry was registered with (``None`` if none)."""
        return self.entry(name).info

    def defaults(self, name: str) -> Dict[str, Any]:
        """The entry's own defaults (a variant's defining numbers), as registered."""
        return dict(self.entry(name).defaults)

    def options(self, name: str) -> Dict[str, Any]:
        """Every option of the entry with its default: the registration's defaults over those of
        what it builds (:func:`keyword_options`), plus the registry's shared options. A required
        option without a default maps to ``inspect.Parameter.empty``."""
        return dict(self._options(name)[0])

    def _options(self, name: str) -> Tuple[Dict[str, Any], bool]:
        entry = self.entry(name)
        found, closed = keyword_options(entry.builds)
        return {**self.shared_options, **found, **entry.defaults}, closed

    def _check_options(self, name: str, kwargs: Dict[str, Any]) -> None:
        options, closed = self._options(name)
        for key in kwargs:
            if closed and key not in options:
                raise InputError(unknown_choice_message(f"{self.kind} '{name}' option", key, sorted(options)))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def import_submodules(package: str, path: Iterable[str]) -> List[str]:
    """Import every module of a package (``import_submodules(__name__, __path__)`` in its
    ``__init__``), so that a new file registers its entries without being listed anywhere."""
    names = [info.name for info in pkgutil.iter_modules(list(path)) if not info.name.startswith("_")]
    for module in names:
        importlib.import_module(f"{package}.{module}")
    return names


# -- configs ----------------------------------------------------------------------------------------
def _locate(path: str) -> Any:
    """The object named by a dotted ``_target_`` path (module prefix, then attributes)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            return functools.reduce(getattr, parts[i:], obj)
        except AttributeError:
            break
    raise InputError(f"_target_ '{path}' does not name an importable object")


def config_default(*, _parent_: Any, _node_: Any) -> Any:
    """The ``${regkit.default:}`` interpolation: the code's default of this key for the node's
    ``_target_`` (a registered factory's :meth:`Registry.options`, else the class's
    :func:`keyword_options`). A config lists an option this way so that the command line can
    override it without ``+`` while the number itself lives only in the code."""
    key = _node_._key()
    target = _parent_.get("_target_") if hasattr(_parent_, "get") else None
    if not isinstance(target, str):
        raise InputError(f"'{key}: ${{regkit.default:}}' needs a _target_ next to it")
    obj = _locate(target)
    registry = getattr(obj, "registry", None)
    if isinstance(registry, Registry):
        options = registry.options(obj.registry_name)
    else:
        options = keyword_options(obj)[0]
    if key not in options:
        raise InputError(unknown_choice_message(f"{target} option", key, sorted(options)))
    value = options[key]
    if value is _NO_DEFAULT:
        raise InputError(f"{target}: option '{key}' has no default; give it a value in the config")
    return list(value) if isinstance(value, tuple) else value


if not OmegaConf.has_resolver("regkit.default"):
    OmegaConf.register_new_resolver("regkit.default", config_default)
