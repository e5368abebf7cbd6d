"""Test-session setup: a persistent XLA compilation cache in a temporary directory.

Many tests build a fresh Trainer (or a fresh `experiments.gpt` subprocess) for the same tiny model, and compiling
dominates their runtime; with the cache, identical programs compile once per session. Numerics are unaffected.
"""

import os

import jax
import pytest

_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": None,  # set below to the session's directory
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Share compiled programs across the tests of this session and the subprocesses they start."""
    env = {**_CACHE_ENV, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_compilation_cache"))}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # inherited by `python -m experiments.gpt` subprocesses
    jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
