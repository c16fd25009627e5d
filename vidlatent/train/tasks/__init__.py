"""Training tasks by name (``TrainConfig.task``): each module here defines one ``Task`` and registers it.

A new task is one file in this folder: a ``Task`` subclass with a ``name``, decorated with ``@register``;
it is found and imported here, so ``task: <name>`` in a train config selects it.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Batch, Draws, Loss, Position, Task

__all__ = ["TASKS", "Batch", "Draws", "Loss", "Position", "Task", "register", "task_class"]

TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Make ``cls`` the task named ``cls.name``."""
    TASKS[cls.name] = cls
    return cls


def task_class(name: str) -> type[Task]:
    """The task registered as ``name``; ValueError naming the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; accepted: {', '.join(sorted(TASKS))}")
    return TASKS[name]


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
