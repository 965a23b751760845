"""A w8a8 recipe (slices/recipe.py::QuantRecipe) bound to one model: the weights each slice is built from and the
calibration activations of each bucket. The one implementation used by `compile --dtype w8a8`, the `rknn-sim`
backend (as its `recipe_build`) and `compile --agreement`, so all three build the same int8 model.

Order of the transforms (each exact in fp32, see rknn/rotation.py and rknn/smoothing.py): rotation
(RMSNorm weights folded into the linears, then the residual stream rotated; embedding and head included) ->
SmoothQuant smoothing with statistics of the rotated model over the calibration text. Slices the recipe keeps in
fp16 are built from the rotated, unsmoothed weights. Calibration activations are captured on the rotated model
(smoothing leaves slice inputs unchanged).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from exo_rknpu.rknn import rotation as rot
from exo_rknpu.rknn import smoothing as sm
from exo_rknpu.rknn.calibration import capture, repad
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.slices.recipe import DEFAULT_RECIPE, QuantRecipe
from exo_rknpu.slices.spec import Buckets, SliceSpec, plan_slices, compiled_inputs


def float_weights(ws: ShardWeights) -> ShardWeights:
    """`ws` with every tensor as a float32 numpy array: the one place the recipe's transforms get float weights
    (compact/quantized in-memory tensors expose `dequantize()`; plain arrays are returned as they are)."""

    def f(a):
        return None if a is None else (np.asarray(a.dequantize(), np.float32) if hasattr(a, "dequantize") else a)

    layers = {i: replace(lw, **{n: f(a) for n, a in lw.arrays().items()}) for i, lw in ws.layers.items()}
    return replace(ws, layers=layers, embed_tokens=f(ws.embed_tokens), final_norm=f(ws.final_norm), lm_head=f(ws.lm_head))


def transform_version() -> str:
    """Changes with the code of the transforms and of the calibration capture (part of every w8a8 cache key)."""
    h = hashlib.sha256()
    from exo_rknpu.rknn import calibration

    for mod in (rot, sm, calibration):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def cache_text(recipe: QuantRecipe, slice_name: str) -> str:
    """The recipe's part of a w8a8 slice's cache key (its build inputs + the transforms' code version)."""
    return f"recipe:{recipe.slice_key(slice_name)};transforms:{transform_version()}"


class RecipeBuild:
    """`recipe` applied to `model` (an alias/path or a ModelSource), computed lazily and once.

    - `build_weights(spec, weights)`: the weights `spec`'s .rknn is built from (smoothed and/or rotated);
    - `calibration(spec, weights, buckets, seq, ctx)`: real activations of that bucket for rknn's calibration;
    - `runtime_weights()`: the weights the host must run the model with (differs from the original only with a
      rotation: the embedding, in the rotated basis).
    `weights` is the caller's shard; it must be the same model (fingerprint), else ValueError.
    """

    def __init__(self, model, recipe: QuantRecipe = DEFAULT_RECIPE, stop: int | None = None,
                 weights: ShardWeights | None = None) -> None:
        # stop: load layers 0..stop only (None: all); weights: layers 0..stop already read (not read again)
        self.model, self.recipe, self.stop, self._loaded = model, recipe, stop, weights
        self._src = None
        self._base: ShardWeights | None = None  # the whole model, rotated if the recipe rotates
        self._smoothed: ShardWeights | None = None
        self._got: dict[tuple, dict] = {}

    def source(self):
        """The model source (resolved once)."""
        if self._src is None:
            from exo_rknpu.model.loader import resolve_model

            self._src = resolve_model(str(self.model)) if isinstance(self.model, (str, Path)) else self.model
        return self._src

    def _ids(self) -> list[int]:
        from exo_rknpu.model.loader import load_tokenizer

        return load_tokenizer(self.source()).encode(self.recipe.text)

    def rotation_matrix(self) -> np.ndarray | None:
        """Q of the recipe's rotation (x_rotated = x Q), None without rotation."""
        if not self.recipe.rotation:
            return None
        from exo_rknpu.model.loader import load_args

        return rot.rotation_matrix(load_args(self.source()).hidden_size, self.recipe.rotation, self.recipe.rotation_seed)

    def runtime_weights(self) -> ShardWeights:
        """The whole model as the recipe's slices expect the host to run it (rotated if the recipe rotates)."""
        if self._base is None:
            from exo_rknpu.model.loader import load_args, load_shard

            src = self.source()
            n = load_args(src).num_hidden_layers
            full = float_weights(self._loaded if self._loaded is not None else load_shard(src, LayerRange(0, self.stop or n, n), weights="fp32"))
            self._loaded = None
            q = self.rotation_matrix()
            if q is not None:
                full = rot.rotate(rot.fold_norms(full), q)
            self._base = full
        return self._base

    @staticmethod
    def _slices(base: ShardWeights) -> list[SliceSpec]:
        lr = base.layer_range
        return [s for s in plan_slices(0, lr.stop, True, lr.is_last, 1) if s.kind != "embed"]

    def _targets(self, base: ShardWeights) -> list[SliceSpec]:
        return [s for s in self._slices(base) if self.recipe.slice_dtype(s.name) == "w8a8"]

    def smoothed_weights(self) -> ShardWeights:
        """The whole model with every w8a8 slice smoothed (the rotated/original weights if smoothing is off)."""
        if self._smoothed is None:
            base = self.runtime_weights()
            r = self.recipe
            targets = self._targets(base)
            if r.smooth_alpha is None or not targets:
                self._smoothed = base
            else:
                stats = sm.calibration_stats(base, targets, self._ids())
                self._smoothed = sm.smooth_shard(base, stats, r.smooth_alpha, r.smooth_groups, r.down_basis)
        return self._smoothed

    def _check(self, weights: ShardWeights) -> None:
        base = self.runtime_weights()
        if weights.fingerprint != base.fingerprint:
            raise ValueError(f"recipe model {self.model!r} is not the model being built "
                             f"(fingerprint {base.fingerprint[:12]}… vs {weights.fingerprint[:12]}…)")

    def build_weights(self, spec: SliceSpec, weights: ShardWeights) -> ShardWeights:
        """The weights `spec` is built from under the recipe (same fp32 function as the original slice, except
        for a rotation, which changes the basis of the hidden state at the slice's boundary)."""
        self._check(weights)
        return self.smoothed_weights() if self.recipe.slice_dtype(spec.name) == "w8a8" else self.runtime_weights()

    def calibration(self, spec: SliceSpec, weights: ShardWeights, buckets: Buckets, seq: int,
                    ctx: int | None) -> list[dict[str, np.ndarray]]:
        """Up to recipe.calibration_samples input sets of `spec` at bucket (seq, ctx), from the calibration text."""
        self._check(weights)
        key = (buckets.seq, buckets.context)
        if key not in self._got:
            base = self.runtime_weights()
            self._got[key] = capture(base, self._slices(base), buckets, self._ids(), per_bucket=self.recipe.calibration_samples,
                                     decode_samples=self.recipe.decode_samples)
        got = self._got[key].get(spec.name, {}).get(seq, [])
        return [compiled_inputs(spec, weights.args, repad(s, ctx)) if (spec.kind == "layers" and ctx) else s for s in got]
