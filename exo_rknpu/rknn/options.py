"""A backend's keyword options from the user's settings: the one place that builds them (generate, node, bench).

Here, in the RKNN room, because the one option that is more than a value is RKNN's: rknn-sim under w8a8 gets
compile's default w8a8 recipe bound to the model (rknn/recipe.py), built once and shared by every shard.
"""

from __future__ import annotations

from exo_rknpu.backends.base import backends_taking, option_names
from exo_rknpu.errors import UsageError
from exo_rknpu.model.zoo import ModelSource

# option -> the flag that sets it (for messages)
FLAGS = {"dtype": "--backend-dtype", "threads": "--threads", "core_mask": "--npu-core-mask"}


def backend_options(backend: str, *, dtype: str | None = None, threads: int | None = None, core_mask: str | None = None,
                    model: ModelSource | str | None = None) -> dict:
    """Options for `backend` from the settings given (None: not given). A setting the backend does not take is
    refused in one line naming the backends that do take it."""
    takes = option_names(backend)
    opts: dict = {}
    for option, value in (("dtype", dtype), ("threads", threads), ("core_mask", core_mask)):
        if value is None:
            continue
        if option not in takes:
            raise UsageError(f"{FLAGS[option]} applies to {' and '.join(backends_taking(option))}, not {backend}")
        opts[option] = value
    if dtype == "w8a8" and "recipe_build" in takes:
        from exo_rknpu.rknn.recipe import RecipeBuild

        if model is None:
            raise UsageError(f"{backend} w8a8 builds with compile's recipe bound to the model; give the model")
        opts["recipe_build"] = RecipeBuild(model)  # compile's default w8a8 recipe, calibrated once for every shard
    return opts
