"""Checkpointing: a thin layer over orbax-checkpoint's `CheckpointManager`.

Each step directory holds two items: `state` (the train-state pytree of jax arrays, optax states included) and `meta`
(a JSON dict: model/train config, tokenizer info, ...). Saves are atomic (orbax writes `<step>.orbax-checkpoint-tmp`
and renames it to `<step>` once every file is written), so a crash mid-save leaves the previous steps restorable; the
debris is ignored and replaced when that step is saved again. Restores go against an abstract target, so namedtuples
come back as namedtuples and arrays land on the target's shardings and dtypes (shapes must match), whatever mesh they
were saved from. Reads and writes are collective: with several jax processes, every process calls every method, as
with orbax itself.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llmjax.errors import UserError

_STATE = "state"
_META = "meta"
_UNSET = "<unset>"


class Checkpointer:
    """Saves and restores (train state, JSON meta) pairs in `directory`, keeping the newest `keep` steps.

    `save` obeys `should_save` (every `save_interval_steps` steps or every `save_interval_seconds` seconds, whichever
    comes first; every call when neither is set) unless `force=True`. With `async_save=False` (the default) `save`
    returns only once the checkpoint is committed to disk; with `async_save=True` it returns after the arrays are
    copied off the device and the write finishes in a background thread (waited for by the next save, `wait()` or
    `close()`). Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep: int = 3,
        save_interval_steps: int | None = None,
        save_interval_seconds: float | None = None,
        async_save: bool = False,
    ) -> None:
        if keep < 1:
            raise UserError(f"checkpoint keep={keep} must be >= 1: pass a positive number of checkpoints to keep")
        if save_interval_steps is not None and save_interval_steps < 1:
            raise UserError(f"save_interval_steps={save_interval_steps} must be >= 1: pass a positive interval or None")
        if save_interval_seconds is not None and save_interval_seconds <= 0:
            raise UserError(
                f"save_interval_seconds={save_interval_seconds} must be > 0: pass a positive interval or None"
            )
        path = os.fspath(directory)
        self._directory = path if "://" in path else os.path.abspath(path)  # keep gs://... URLs as they are
        if os.path.isfile(self._directory):
            raise UserError(f"checkpoint directory {self._directory} is a file: pass a directory path")
        self._save_interval_steps = save_interval_steps
        self._save_interval_seconds = save_interval_seconds
        self._async_save = async_save
        self._last_save_time = time.monotonic()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            enable_async_checkpointing=async_save,
            create=False,  # the first save creates the directory; merely reading a wrong path should not
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()  # lets metadata reads work before any save
        for args_type in (ocp.args.StandardSave, ocp.args.StandardRestore):
            registry.add(_STATE, args_type, ocp.handlers.StandardCheckpointHandler)
        for args_type in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add(_META, args_type, ocp.handlers.JsonCheckpointHandler)
        try:
            self._manager = ocp.CheckpointManager(self._directory, options=options, handler_registry=registry)
        except Exception as e:  # orbax raises many types for unreadable step metadata; report them all the same way
            raise _unreadable(self._directory, None, e) from e

    @property
    def directory(self) -> str:
        """Absolute path of the checkpoint root (step directories live directly under it)."""
        return self._directory

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (in-progress and interrupted saves are not listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None if there is none."""
        return self._manager.latest_step()

    def should_save(self, step: int, now: float | None = None) -> bool:
        """Whether `save(step, ...)` will write: every `save_interval_steps` steps or `save_interval_seconds` after
        the last save (`now` is a `time.monotonic()` reading, defaulting to the current one). Always True when no
        interval is configured. With several processes the time-based decision is process 0's, so all agree."""
        if self._save_interval_steps is None and self._save_interval_seconds is None:
            return True
        if self._save_interval_steps is not None and step % self._save_interval_steps == 0:
            return True
        if self._save_interval_seconds is None:
            return False
        now = time.monotonic() if now is None else now
        due = now - self._last_save_time >= self._save_interval_seconds
        if jax.process_count() > 1:  # clocks differ across hosts; a split decision would deadlock the collective save
            due = bool(multihost_utils.broadcast_one_to_all(np.bool_(due)))
        return due

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Saves `state` (a pytree of arrays) and `meta` (a JSON-serializable dict) as `step`; returns whether it did.

        Skipped when `should_save(step)` is False (unless `force`) or when `step` is already saved (checkpoints are
        never overwritten). Older steps beyond `keep` are deleted once this one is committed.
        """
        if step in self._manager.all_steps():
            return False
        if not force and not self.should_save(step):
            return False
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(dict(meta))})
        self._manager.save(step, args=args, force=True)
        if not self._async_save:
            self._manager.wait_until_finished()
        self._last_save_time = time.monotonic()
        return True

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores (state, meta) from `step` (default: the latest) into the structure, dtypes and shardings of
        `abstract_state`, a pytree of `jax.ShapeDtypeStruct` (e.g. from `jax.eval_shape`) or of arrays."""
        step = self._existing_step(step)
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state), _META: ocp.args.JsonRestore()})
        try:
            saved_shapes = _leaf_shapes(self._manager.item_metadata(step)[_STATE].tree)
        except Exception as e:  # see below
            raise _unreadable(self._directory, step, e) from e
        for name, shape in _leaf_shapes(abstract_state).items():
            if name in saved_shapes and saved_shapes[name] != shape:
                raise UserError(
                    f"checkpoint {os.path.join(self._directory, str(step))} has {name} of shape {saved_shapes[name]} "
                    f"but the current model expects {shape}: use matching flags or a fresh --workdir"
                )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # corrupt files and target mismatches surface as assorted orbax/tensorstore errors
            raise _unreadable(self._directory, step, e) from e
        return restored[_STATE], restored[_META]

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """Reads only the JSON meta of `step` (default: the latest), so callers can check compatibility first."""
        step = self._existing_step(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
        except Exception as e:  # see restore()
            raise _unreadable(self._directory, step, e) from e
        meta = restored[_META]
        if not isinstance(meta, dict):
            raise _unreadable(self._directory, step, TypeError(f"meta is a {type(meta).__name__}, not a dict"))
        return meta

    def wait(self) -> None:
        """Blocks until any background (async) save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and deletions and releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _existing_step(self, step: int | None) -> int:
        """`step`, or the latest one when None; UserError if there is no such committed step."""
        steps = self.all_steps()
        if not steps:
            raise UserError(f"no checkpoint found in {self._directory}: train first or pass the right --workdir")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise UserError(f"no checkpoint for step {step} in {self._directory}: pick one of the saved steps {steps}")
        return step


def check_compatible(
    saved_meta: Mapping[str, Any],
    current_meta: Mapping[str, Any],
    keys: tuple[str, ...],
    *,
    directory: str | os.PathLike[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Raises UserError naming the first of `keys` whose value differs between a checkpoint's meta and the current
    one. A key may be dotted ("model.n_embd") to reach into nested dicts; a key missing on one side differs, except
    that a key the checkpoint predates matches its value in `defaults` (a config field added later, whose default
    is the old behaviour). The current meta is compared as it will read back from JSON (tuples become lists, ...).
    `directory`, if given, is named in the message."""
    current = json.loads(json.dumps(current_meta))
    old_defaults = json.loads(json.dumps(dict(defaults or {})))
    where = "checkpoint" if directory is None else f"checkpoint in {os.fspath(directory)}"
    for key in keys:
        saved_value, current_value = _lookup(saved_meta, key), _lookup(current, key)
        if saved_value is _UNSET and key in old_defaults:
            saved_value = old_defaults[key]
        if saved_value != current_value:
            raise UserError(
                f"{where} was trained with {key}={_show(saved_value)} but the current "
                f"config has {key}={_show(current_value)}: use a fresh --workdir or matching flags"
            )


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Leaf shapes by dotted path ("opt_state.0.mu.wte"), for arrays, ShapeDtypeStructs and orbax array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def _key_name(key: Any) -> str:
    """One path element as orbax names it: dict key, sequence index or attribute (namedtuple field) name."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _lookup(meta: Mapping[str, Any], dotted_key: str) -> Any:
    """The value at `dotted_key` in nested dicts, or the `_UNSET` marker."""
    value: Any = meta
    for part in dotted_key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _UNSET
        value = value[part]
    return value


def _show(value: Any) -> str:
    """A value as it would be typed on a command line (JSON, bare for plain strings)."""
    return value if isinstance(value, str) else json.dumps(value)


def _unreadable(directory: str, step: int | None, error: BaseException) -> UserError:
    """The UserError for a checkpoint that orbax cannot read (corrupt, truncated or saved from another structure)."""
    where = directory if step is None else os.path.join(directory, str(step))
    detail = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    return UserError(
        f"checkpoint {where} is unreadable or does not match the current model ({detail}): "
        f"fix or move it away, or use a fresh --workdir (nothing was deleted)"
    )
