"""The w8a8 recipe: everything that decides which int8 model a w8a8 build is, as one value.

Used by `exo-rknpu compile --dtype w8a8`, the `rknn-sim` backend (`generate --backend rknn-sim --backend-dtype
w8a8`) and `compile --agreement`, recorded in each w8a8 manifest (`quantization.recipe`) and part of each w8a8
cache key (a changed recipe is a cache miss). Plain data: the functions that apply it (smoothing, rotation,
calibration capture) live in rknn/recipe.py; the toolkit side (policy, range algorithm) in rknn/venv/worker.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# which linear layers (rknn Convs made from a MatMul) are int8; every other op is float16 (rknn/venv/worker.py)
POLICIES = ("linear", "linear-fp16-down", "mlp-gate-up", "linear-fp16-gate-down")
ALGORITHMS = ("normal", "mmse", "kl_divergence")  # rknn's activation-range algorithms (normal = min/max)
ROTATIONS = (None, "hadamard", "orthogonal")
DOWN_BASES = ("up_out", "down")
SMOOTH_GROUPS = ("qkv", "gate_up", "down", "head")
HEAD_DTYPES = ("w8a8", "fp16")
# the decoder layer's linears each policy makes int8 (rknn/venv/worker.py finds them in rknn's graph)
INT8_LINEARS = {
    "linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "linear-fp16-down": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"),
    "linear-fp16-gate-down": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"),
    "mlp-gate-up": ("gate_proj", "up_proj"),
}


@dataclass(frozen=True)
class QuantRecipe:
    """How a w8a8 model is made from the fp32 weights (see docs/compiler.md for the measured choices).

    policy: which linears are int8 (POLICIES); algorithm: rknn's range algorithm; smooth_alpha: SmoothQuant
    migration strength (None: no smoothing), over `smooth_groups`, the down group flattening `down_basis`;
    rotation: orthogonal rotation of the residual stream (None, "hadamard", "orthogonal"; seeded by
    rotation_seed); calibration_text: the text whose activations set the ranges (and the smoothing statistics),
    calibration_samples per prefill bucket, decode_samples per decode (seq 1) bucket; fp16_layers: decoder layers built entirely in fp16; head: the head's dtype.
    """

    policy: str = "linear-fp16-gate-down"
    algorithm: str = "normal"
    smooth_alpha: float | None = 0.7
    smooth_groups: tuple[str, ...] = SMOOTH_GROUPS
    down_basis: str = "up_out"
    rotation: str | None = None
    rotation_seed: int = 0
    calibration_text: str = field(default="", repr=False)  # "" = the project's CALIBRATION_TEXT
    calibration_samples: int = 4
    decode_samples: int = 64  # seq-1 buckets: one token per sample, so many more samples for the same ranges
    # measured on smollm2-135m (docs/compiler.md): the first two layers carry the largest per-layer hidden-state
    # error and the head's int8 logits cost agreement; keeping them fp16 took the simulator from 86.4 % to 94.6 %
    # top-1 agreement for 219.5 vs 187.6 MB of weights per token (fp16: 269.0)
    fp16_layers: tuple[int, ...] = (0, 1)
    head: str = "fp16"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown quantization policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown quantization algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.smooth_alpha is not None and not (0.0 < self.smooth_alpha <= 1.0):
            raise ValueError(f"smooth_alpha must be in (0, 1] or None (off), got {self.smooth_alpha}")
        if not set(self.smooth_groups) <= set(SMOOTH_GROUPS):
            raise ValueError(f"unknown smoothing groups {sorted(set(self.smooth_groups) - set(SMOOTH_GROUPS))}; "
                             f"choose from {', '.join(SMOOTH_GROUPS)}")
        if self.down_basis not in DOWN_BASES:
            raise ValueError(f"unknown down basis {self.down_basis!r}; choose one of {', '.join(DOWN_BASES)}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"unknown rotation {self.rotation!r}; choose none, hadamard or orthogonal")
        if self.calibration_samples < 1 or self.decode_samples < 1:
            raise ValueError(f"calibration_samples and decode_samples must be >= 1, got {self.calibration_samples}, "
                             f"{self.decode_samples}")
        if any(i < 0 for i in self.fp16_layers):
            raise ValueError(f"fp16_layers must be layer numbers >= 0, got {self.fp16_layers}")
        if self.head not in HEAD_DTYPES:
            raise ValueError(f"unknown head dtype {self.head!r}; choose w8a8 or fp16")
        # canonical forms, so equal recipes compare (and hash) equal
        from exo_rknpu.slices.calibration_text import CALIBRATION_TEXT

        if self.calibration_text == CALIBRATION_TEXT:
            object.__setattr__(self, "calibration_text", "")
        object.__setattr__(self, "fp16_layers", tuple(sorted(set(int(i) for i in self.fp16_layers))))
        object.__setattr__(self, "smooth_groups", tuple(g for g in SMOOTH_GROUPS if g in self.smooth_groups))

    def int8_linears(self, name: str) -> tuple[str, ...]:
        """The linears of slice `name` that are int8 ('lm_head' for a w8a8 head; () for an fp16 slice)."""
        if self.slice_dtype(name) == "fp16":
            return ()
        return ("lm_head",) if name == "head" else INT8_LINEARS[self.policy]

    # -- per slice ------------------------------------------------------------------------------------------
    def slice_dtype(self, name: str) -> str:
        """'fp16' for a slice kept in float16 by this recipe ('layers.N' in fp16_layers, or the head), else 'w8a8'."""
        if name == "head":
            return self.head
        if name.startswith("layers."):
            lo, _, hi = name[len("layers."):].partition("-")
            rng = range(int(lo), int(hi or lo) + 1)
            kept = [i in self.fp16_layers for i in rng]
            if any(kept) and not all(kept):
                raise ValueError(f"slice {name} mixes fp16 and w8a8 layers of the recipe; use one layer per slice")
            return "fp16" if all(kept) else "w8a8"
        return "fp16"

    def slice_key(self, name: str) -> str:
        """What a slice's build depends on, as stable text for its cache key: the recipe without the other
        slices' precision (changing fp16_layers rebuilds only the slices whose precision changed)."""
        d = self.to_dict()
        d.pop("fp16_layers")
        d.pop("head")
        d["calibration_text"] = hashlib.sha256(self.text.encode()).hexdigest()
        d["slice_dtype"] = self.slice_dtype(name)
        return json.dumps(d, sort_keys=True)

    @property
    def text(self) -> str:
        """The calibration text (the project's CALIBRATION_TEXT unless the recipe names another)."""
        if self.calibration_text:
            return self.calibration_text
        from exo_rknpu.slices.calibration_text import CALIBRATION_TEXT

        return CALIBRATION_TEXT

    # -- (de)serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; `calibration_text` is written out in full so a manifest says exactly what was used."""
        d = asdict(self)
        d["smooth_groups"], d["fp16_layers"] = list(self.smooth_groups), list(self.fp16_layers)
        d["calibration_text"] = self.text
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantRecipe":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)} (written by a newer exo-rknpu?)")
        kw = dict(d)
        for k in ("smooth_groups", "fp16_layers"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def but(self, **changes: Any) -> "QuantRecipe":
        """A copy with some fields changed (validated)."""
        return replace(self, **changes)

    def describe(self) -> str:
        """One line for logs and tables."""
        parts = [self.policy, self.algorithm,
                 f"smooth {self.smooth_alpha:g}" if self.smooth_alpha is not None else "no smoothing",
                 f"rotation {self.rotation}" if self.rotation else "no rotation", f"head {self.head}"]
        if self.fp16_layers:
            parts.append("fp16 layers " + ",".join(map(str, self.fp16_layers)))
        return ", ".join(parts)


DEFAULT_RECIPE = QuantRecipe()


@dataclass(frozen=True)
class NamedRecipe:
    """A w8a8 recipe users pick by name (`compile --recipe NAME`): the default recipe with a chosen set of
    decoder layers in w8a8 and the others in fp16. `int8_layers` None keeps the default's fp16 layers, "all" makes
    every layer w8a8, a tuple makes exactly those layers w8a8 (resolved against the model's layer count);
    `head` is the head's dtype. `measured` is the one-line figure it was chosen by (docs/compiler.md)."""

    name: str
    int8_layers: tuple[int, ...] | str | None
    head: str
    measured: str

    def resolve(self, n_layers: int) -> QuantRecipe:
        """The recipe for a model with `n_layers` decoder layers; ValueError if it names a layer the model lacks."""
        if self.int8_layers is None:
            return DEFAULT_RECIPE.but(head=self.head)
        if self.int8_layers == "all":
            return DEFAULT_RECIPE.but(fp16_layers=(), head=self.head)
        missing = [i for i in self.int8_layers if i >= n_layers]
        if missing:
            raise ValueError(f"recipe {self.name!r} makes layers {','.join(map(str, self.int8_layers))} int8, but the "
                             f"model has {n_layers} layers (0-{n_layers - 1}); pick layers with --fp16-layers instead")
        return DEFAULT_RECIPE.but(fp16_layers=tuple(i for i in range(n_layers) if i not in self.int8_layers), head=self.head)


# figures: rknn-toolkit2 2.5.0 simulator, smollm2-135m, NPU form, top-1 agreement with fp32 over the held-out text
# (242 tokens, 32-token prefill chunks), weight bytes read per decoded token (fp16: 269.0 MB, exact);
# docs/compiler.md, "Recipes to pick"
NAMED_RECIPES: dict[str, NamedRecipe] = {r.name: r for r in (
    NamedRecipe("default", None, "fp16", "layers 2-29 w8a8, layers 0, 1 and the head fp16: 93.0 %, 219.5 MB/token"),
    NamedRecipe("int8-layers", "all", "w8a8", "every layer and the head w8a8: 86.4 % ('seq' form), 187.6 MB/token"),
    # the cheapest mix found that reaches 98 %: the two layers with the smallest error in numpy emulation on another
    # text (tests/data/heldout.txt); a third one already fell below 98 % there
    NamedRecipe("agree98", (7, 14), "fp16", "layers 7 and 14 w8a8, the rest and the head fp16: 100 %, 265.5 MB/token"),
)}


def named_recipe(name: str, n_layers: int) -> QuantRecipe:
    """The recipe called `name` (NAMED_RECIPES) for a model with `n_layers` layers; ValueError naming the choices."""
    if name not in NAMED_RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(NAMED_RECIPES)}")
    return NAMED_RECIPES[name].resolve(n_layers)
