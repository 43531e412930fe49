"""Name -> factory registries for models and losses.

Each model and loss is registered under the name of its YAML file in ``configs/``, so the
same word selects it on the command line (``model=vxm1``) and in Python
(``regkit.create_model("vxm1")``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional

from regkit.errors import InputError, unknown_choice_message


class Registry:
    """A case-sensitive map from names to factories.

    Registering a name twice raises; looking up an unknown name raises ``ValueError`` listing
    the valid names and the closest match. Factories registered here record how they were
    called on the object they return (``obj.regkit_spec = {"name": ..., "kwargs": ...}``) so a
    checkpoint can rebuild the object from plain data, through this registry only.
    """

    def __init__(self, kind: str, build: Optional[Callable[[Callable[..., Any], Dict[str, Any]], Any]] = None) -> None:
        """``build(fn, kwargs)``, if given, calls every registered factory (a hook for options
        that all entries share, such as the models' ``cascades``)."""
        self.kind = kind
        self._build = build
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, fn: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None):
        """Decorator: ``@MODELS.register`` or ``@MODELS.register(name="x")``."""
        if fn is None:
            return functools.partial(self.register, name=name)
        key = name or fn.__name__
        if key in self._entries:
            old = self._entries[key]
            raise ValueError(
                f"{self.kind} '{key}' is already registered by {old.__module__}.{old.__qualname__}; "
                f"cannot register {fn.__module__}.{fn.__qualname__} under the same name."
            )

        @functools.wraps(fn)
        def factory(*args, **kwargs):
            if args or self._build is None:
                obj = fn(*args, **kwargs)
            else:
                obj = self._build(fn, dict(kwargs))
            if args:  # positional arguments cannot be recorded by name
                return obj
            try:
                obj.regkit_spec = {"name": key, "kwargs": dict(kwargs)}
            except AttributeError:  # objects without __dict__ (e.g. plain functions' results)
                pass
            return obj

        factory.registry_name = key
        self._entries[key] = factory
        return factory

    def get(self, name: str) -> Callable[..., Any]:
        if not isinstance(name, str) or name not in self._entries:
            raise InputError(unknown_choice_message(self.kind, name, self.names()))
        return self._entries[name]

    def create(self, name: str, **overrides: Any) -> Any:
        return self.get(name)(**overrides)

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
