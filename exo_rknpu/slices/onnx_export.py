"""Record a slice (slices/graph.py) as an ONNX graph, built directly with onnx.helper: no torch, no tracing.

Shapes are symbolic ("S", "C") by default so one onnxruntime session serves every bucket; the compiler asks
for concrete (seq, ctx) to get the static graphs the NPU needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exo_rknpu.model.base import ModelArgs
from exo_rknpu.model.quant import QTensor, native_format, native_parts, split8
from exo_rknpu.model.weights import ShardWeights
from exo_rknpu.slices.graph import run_slice
from exo_rknpu.slices.spec import SliceSpec, per_layer_cache_names, slice_kernels, state_name, state_width

OPSET = 17  # rknn-toolkit2 2.5 pins onnx<=1.18; opset 17 / IR 8 loads there and in current onnxruntime
IR_VERSION = 8
# "sdpa": the op pattern the RKNN compiler fuses (copies the cache: concat + repeat); "split": no cache copy, for CPUs;
# "gqa": onnxruntime's GroupQueryAttention (com.microsoft), one op per layer doing rope, attention over the written
# positions only and the cache write, in place in the cache buffer the runner binds (backends/ort.py). onnxruntime only.
ATTENTION_FORMS = ("sdpa", "split", "gqa")
# the "gqa" form's inputs besides the layer state and caches: per request the index of its last position
# (cached + new - 1, int32 [B]), their maximum + 1 (int32 scalar), and rotary tables by position [P, hd/2]
GQA_INPUTS = ("seqlens_k", "total_sequence_length", "cos_cache", "sin_cache")
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (MatMulNBits)
# the native kernel's op (exo_rknpu/native/ort_op.c): QMatMul(x, packed) with attributes fmt, K, N; sessions of a
# graph holding it register the native library (backends/ort.py)
NATIVE_DOMAIN, NATIVE_OP = "exo_rknpu", "QMatMul"
# QMatMul over gate|up stacked with the MLP's activation after it: silu(x @ gate.T) * (x @ up.T) [..., N/2] in one op
# (ort_op.c), written for native gate/up (no Split, Sigmoid, Mul between kernels: ~40 us each at 8 rows)
NATIVE_SWIGLU_OP = "QMatMulSwiGLU"
# the native library's attention (exo_rknpu/native/attention.c): GroupQueryAttention's inputs and outputs for a packed
# q|k|v (no separate k, v), written instead of it in graphs whose linears are native (the library is loaded for
# them anyway): a request's result does not depend on the batch around it, and a batched decode step costs ~half
NATIVE_ATTENTION_OP = "Attention"
# the native library's norms (exo_rknpu/native/norm.c), written in graphs whose linears are native: RMSNorm, and
# AddRMSNorm for a residual Add whose sum is normed next (outputs the norm and the sum); one fixed order on the
# calling thread, where onnxruntime's SimplifiedLayerNormalization and Add wake its pool at several rows
NATIVE_NORM_OP, NATIVE_ADD_NORM_OP = "RMSNorm", "AddRMSNorm"
# MatMulNBits accuracy_level: 4 quantizes activations to int8 per block inside the kernel (fast; rounded differently
# per instruction set); 1 keeps them float32 (QTensor.kernel "fp32": the same answers on every CPU). Measured
# on onnxruntime 1.32 (x86 AVX2, CPU time of a decode step): 4-bit at level 1 is ~3x slower than at level 4 and
# 8-bit at level 1 takes a dequantize-everything fallback (~20x slower), so 8-bit blocks with float32 activations
# run as 4-bit blocks over K doubled (quant.split8).
ACCURACY_INT8, ACCURACY_FP32 = 4, 1
EXTERNAL_MIN_BYTES = 1 << 10  # tensors at least this big are handed over outside the protobuf (no 2 GiB limit)
MEMORY_LOCATION = "in-memory"  # external-data location of initializers handed to onnxruntime as OrtValues


@dataclass(frozen=True)
class PendingPack:
    """The native kernel's packed bytes of `ws` stacked row-wise (format `fmt`), made only when read (`packed`,
    `materialize`): a slice's store writes its tensors one at a time (backends/prepared.py), so a first start holds
    one tensor's packed bytes beside the slice's weights, not all of them (measured on the 1B shape from bf16:
    ~170 MB less at the load's peak)."""

    ws: tuple[QTensor, ...]
    fmt: int
    dtype: ClassVar[np.dtype] = np.dtype(np.uint8)

    @property
    def shape(self) -> tuple[int]:
        from exo_rknpu import native

        return (native.packed_bytes(self.fmt, sum(w.shape[0] for w in self.ws), self.ws[0].shape[1]),)

    @property
    def nbytes(self) -> int:
        return self.shape[0]

    def packed(self) -> np.ndarray:
        """The packed bytes (1-D uint8); a stacked copy of q/k/v or gate/up lives only while they are made (and
        becomes their codes in place)."""
        from exo_rknpu import native

        w = self.ws[0] if len(self.ws) == 1 else stack_rows(list(self.ws))
        p = native_parts(w, owned=len(self.ws) > 1)
        del w
        return native.pack(p.fmt, p.d, p.codes, p.m, p.sc)


def materialize(a: "np.ndarray | PendingPack") -> np.ndarray:
    """An external initializer's array (a PendingPack packed now)."""
    return a.packed() if isinstance(a, PendingPack) else a


@dataclass
class _Graph:
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    consts: dict[tuple, str] = field(default_factory=dict)
    weight_names: dict[object, str] = field(default_factory=dict)  # id(weight) (and a form) -> initializer name(s)
    external: dict[str, "np.ndarray | PendingPack"] = field(default_factory=dict)  # name -> array kept out of the proto
    stacked: dict[tuple, QTensor] = field(default_factory=dict)  # fused linears (kept alive: ids are their keys)
    split_of: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # Split output -> (input, outputs)
    split: dict[int, tuple[QTensor, QTensor]] = field(default_factory=dict)  # id(8-bit) -> (it, its split8 form)
    counter: int = 0

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter}"


class OnnxOps:
    """Symbolic ops: each call appends nodes and returns the output value's name."""

    def __init__(self, attention_form: str = "sdpa", compact: bool = False) -> None:
        if attention_form not in ATTENTION_FORMS:
            raise ValueError(f"attention_form must be one of {ATTENTION_FORMS}")
        if attention_form == "gqa" and not compact:
            raise ValueError("the 'gqa' attention form is onnxruntime's (compact) form only")
        self.g = _Graph()
        self.attention_form = attention_form
        # compact: QTensors become MatMulNBits and big tensors stay outside the proto (onnxruntime);
        # otherwise every weight is a float32 initializer inside the proto (the NPU compiler's input)
        self.compact = compact
        self.n_layers = 0  # layers in the slice being recorded (set by build_onnx)
        self.args: ModelArgs | None = None  # the model's hyper-parameters (set by build_onnx)
        self.native_attention = False  # the "gqa" form as NATIVE_ATTENTION_OP (set by build_onnx: native weights)
        self.native_norms = False  # norms as NATIVE_NORM_OP / NATIVE_ADD_NORM_OP (set by build_onnx: native weights)

    @property
    def batch(self) -> int:
        """Leading dim of head reshapes: 0 (Reshape's "keep the input's") in onnxruntime's form, whose graphs take a
        batch of requests (dim "B": one decode step of several requests, each row its own position and cache);
        1 in the NPU compiler's form (static shapes, batch 1)."""
        return 0 if self.compact else 1

    # -- helpers --------------------------------------------------------------------------
    def _node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.g.fresh(op.lower())
        self.g.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def _const(self, value: np.ndarray, prefix: str = "c") -> str:
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self.g.consts:
            name = self.g.fresh(prefix)
            self.g.initializers.append(numpy_helper.from_array(value, name))
            self.g.consts[key] = name
        return self.g.consts[key]

    def _weight(self, w: np.ndarray | QTensor, transpose: bool = False) -> str:
        # Same array object -> same initializer (a tied embedding/head is stored once per layout).
        key = id(w) * 2 + int(transpose)
        if key not in self.g.weight_names:
            if isinstance(w, QTensor):  # a float graph of compact weights (the compiler's input)
                w = w.dequantize()
            arr = np.ascontiguousarray(w.T if transpose else w, dtype=np.float32)
            self.g.weight_names[key] = self._initializer(arr, "w")
        return self.g.weight_names[key]

    def _initializer(self, arr: "np.ndarray | PendingPack", prefix: str) -> str:
        name = self.g.fresh(prefix)
        if self.compact and arr.nbytes >= EXTERNAL_MIN_BYTES:
            self.g.initializers.append(external_tensor(name, arr, MEMORY_LOCATION))
            self.g.external[name] = arr
        else:
            self.g.initializers.append(numpy_helper.from_array(materialize(arr), name))
        return name

    def _compact_linear(self, x: str, ws: list[QTensor]) -> str:
        """x @ [ws stacked row-wise].T in onnxruntime's form, by the kernel the weights name (QTensor.kernel)."""
        if ws[0].kernel == "native":
            return self._qmatmul(x, ws)
        if len(ws) == 1:
            return self._matmul_nbits(x, ws[0])
        key = tuple(id(w) for w in ws)
        if key not in self.g.stacked:
            self.g.stacked[key] = stack_rows(ws)
        return self._matmul_nbits(x, self.g.stacked[key])

    def _qmatmul(self, x: str, ws: list[QTensor], op: str = NATIVE_OP) -> str:
        """x @ [ws stacked].T with the native kernel (NATIVE_OP): one initializer, the packed bytes
        (exo_rknpu.native.pack of quant.native_parts), one per tensor (a tied head packs its own, the embedding
        stays a row table), left a PendingPack: packed when written, so a slice's export holds its weights once
        plus one tensor's packed form."""
        key = ("native", *(id(w) for w in ws))
        if key not in self.g.weight_names:
            pending = PendingPack(tuple(ws), native_format(ws[0]))
            n = sum(w.shape[0] for w in ws)
            self.g.weight_names[key] = f"{self._initializer(pending, 'qp')},{pending.fmt},{n},{ws[0].shape[1]}"
        name, fmt, n, k = self.g.weight_names[key].split(",")
        out = self.g.fresh(op.lower())
        self.g.nodes.append(helper.make_node(op, [x, name], [out], name=out, domain=NATIVE_DOMAIN,
                                             fmt=int(fmt), K=int(k), N=int(n)))
        return out

    def _matmul_nbits(self, x: str, w: QTensor) -> str:
        """x @ w.T with onnxruntime's weight-only kernel: the QTensor's arrays are its inputs as they are. 8-bit
        blocks with float32 activations run as 4-bit blocks over K doubled, multiplied with [16 x_j | x_j] per block
        (quant.split8, quant.split8_input); per-block mins (exact Q4_1) add blocksum(x) @ mins.T."""
        if w.bits == 8 and w.kernel == "fp32":
            if id(w) not in self.g.split:
                self.g.split[id(w)] = (w, split8(w))
            x = self._split8_input(x, w.block_size)
            w = self.g.split[id(w)][1]
        key = id(w) * 2
        if key not in self.g.weight_names:
            names = [self._initializer(w.blocks, "qb"), self._initializer(w.scales, "qs")]
            if w.zero_points is not None:
                names.append(self._initializer(w.zero_points, "qz"))
            self.g.weight_names[key] = ",".join(names)
        out = self.g.fresh("matmulnbits")
        self.g.nodes.append(helper.make_node(
            "MatMulNBits", [x, *self.g.weight_names[key].split(",")], [out], name=out, domain=MS_DOMAIN,
            K=w.shape[1], N=w.shape[0], bits=w.bits, block_size=w.block_size,
            accuracy_level=ACCURACY_FP32 if w.kernel == "fp32" else ACCURACY_INT8))
        if w.mins is None:
            return out
        sums = self._node("ReduceSum", [self._node("Reshape", [x, self._shape([0, 0, w.n_blocks, w.block_size])]),
                                        self._const(np.array([-1], np.int64))], keepdims=0)  # [B, S, K/block]
        mins_key = ("mins", id(w))
        if mins_key not in self.g.weight_names:
            self.g.weight_names[mins_key] = self._initializer(np.ascontiguousarray(w.mins.T), "qm")
        return self._node("Add", [out, self._node("MatMul", [sums, self.g.weight_names[mins_key]])])

    def _split8_input(self, x: str, block_size: int) -> str:
        """quant.split8_input in the graph: [B,S,K] -> [B,S,K/b,b] -> concat(16 x, x) -> [B,S,2K] (once per input)."""
        key = ("split8_input", x, block_size)
        if key not in self.g.weight_names:
            xb = self._node("Reshape", [x, self._shape([0, 0, -1, block_size])])
            both = self._node("Concat", [self._node("Mul", [xb, self._const(np.array(16, np.float32))]), xb], axis=-1)
            self.g.weight_names[key] = self._node("Reshape", [both, self._shape([0, 0, -1])])
        return self.g.weight_names[key]

    def _shape(self, dims: list[int]) -> str:
        return self._const(np.array(dims, dtype=np.int64), "shape")

    # -- fused forms (graph.Fused): written where `fuses` says so -----------------------------------
    def fuses(self, form, *weights):
        """rotary: in onnxruntime's (compact) form (the NPU compiler gets the plain op pattern); cached_attention:
        in its "gqa" form; swiglu: native gate/up of one kind whose rows fill whole row groups (the op's chunks take
        gate and up rows alike); add_rms_norm: where the norms are native and the norm's width fits them."""
        if form == "rotary":
            return self.compact
        if form == "cached_attention":
            return self.compact and self.attention_form == "gqa"
        if form == "swiglu":
            from exo_rknpu.native.pack import ROW_GROUP

            gate, up = weights
            return (self.compact and all(isinstance(w, QTensor) and w.kernel == "native" for w in weights)
                    and len({stack_kind(w) for w in weights}) == 1 and gate.shape[0] == up.shape[0]
                    and gate.shape[0] % ROW_GROUP == 0)
        if form == "add_rms_norm":
            (w,) = weights
            return self._native_norm_fits(w)
        raise ValueError(f"unknown fused form {form!r}")

    def cached_attention(self, q, k, v, past_k, past_v, scale):
        """GroupQueryAttention over q [B,S,nh*hd], k/v [B,S,kv*hd] and one layer's cache input past_k.i
        [B,kv,C,hd]: rope (from the cos/sin_cache tables at each request's positions), causal attention over the
        first seqlens_k+1 positions, the new rows written at positions seqlens_k-S+1.. of the output present_k.i.
        When the runner binds present_k.i to past_k.i's memory, that write is the only cache traffic.
        With `native_attention` the native library's NATIVE_ATTENTION_OP does the same over q|k|v packed."""
        a = self.args
        present_k, present_v = (n.replace("past_", "present_", 1) for n in (past_k, past_v))
        packed, outs = self.g.split_of.get(q, ("", ()))
        out = self.g.fresh("gqa")
        if self.native_attention:
            if outs != (q, k, v):  # (q/k norms or biases between the split and here) packed again: a small copy
                packed = self._node("Concat", [q, k, v], axis=-1)
            self.g.nodes.append(helper.make_node(
                NATIVE_ATTENTION_OP, [packed, past_k, past_v, *GQA_INPUTS], [out, present_k, present_v], name=out,
                domain=NATIVE_DOMAIN, num_heads=a.num_attention_heads, kv_num_heads=a.num_key_value_heads,
                scale=float(scale)))
            return out, present_k, present_v
        if outs == (q, k, v):  # q, k, v are one Split of one tensor: GroupQueryAttention takes it packed
            q, k, v = packed, "", ""
        self.g.nodes.append(helper.make_node(
            "GroupQueryAttention", [q, k, v, past_k, past_v, *GQA_INPUTS], [out, present_k, present_v], name=out,
            domain=MS_DOMAIN, num_heads=a.num_attention_heads, kv_num_heads=a.num_key_value_heads, scale=float(scale),
            do_rotary=1, rotary_interleaved=0))
        return out, present_k, present_v

    def rotary(self, x, cos, sin, head_dim):
        """onnxruntime's RotaryEmbedding (com.microsoft, rotate-half): one node instead of seven per q/k. Its tables
        are the first halves of the host's cos/sin rows ([S, hd/2]), indexed by positions 0..S-1."""
        key = ("rotary", cos, sin)
        if key not in self.g.consts:
            half = head_dim // 2
            table = []
            for t in (cos, sin):
                first = self._node("Slice", [t, *self._range(0, half), self._const(np.array([-1], np.int64))])
                table.append(self._node("Reshape", [first, self._shape([-1, half])]))
            # rows of the tables are the batch's [B,S] positions in order: position id b*S+s picks row (b, s)
            n = self._node("Gather", [self._node("Shape", [table[0]]), self._const(np.array(0, np.int64))], axis=0)
            positions = self._node("Range", [self._const(np.array(0, np.int64)), n, self._const(np.array(1, np.int64))])
            seq = self._node("Slice", [self._node("Shape", [cos]), *self._range(2, 3)])
            pos = self._node("Reshape", [positions, self._node("Concat", [self._const(np.array([-1], np.int64)), seq], axis=0)])
            self.g.consts[key] = ",".join([pos, *table])
        pos, cos_t, sin_t = self.g.consts[key].split(",")
        out = self.g.fresh("rotary")
        self.g.nodes.append(helper.make_node("RotaryEmbedding", [x, pos, cos_t, sin_t], [out], name=out, domain=MS_DOMAIN,
                                             interleaved=0))
        return out

    def swiglu(self, x, gate, up):
        """silu(x @ gate.T) * (x @ up.T) as one NATIVE_SWIGLU_OP over gate|up packed as QMatMul's."""
        return self._qmatmul(x, [gate, up], NATIVE_SWIGLU_OP)

    def add_rms_norm(self, a, b, w, eps):
        """(NATIVE_NORM_OP of a + b, a + b) as one NATIVE_ADD_NORM_OP: the norm is RMSNorm's, so a slice boundary
        between a residual sum and its norm changes no bit. The sum is named as an Add would be, before the norm's
        name: the graph bytes are those the exporter made when it rewrote the residual Add in place."""
        s, y = self.g.fresh("add"), self.g.fresh("rmsnorm")
        self.g.nodes.append(helper.make_node(NATIVE_ADD_NORM_OP, [a, b, self._weight(w)], [y, s], name=y,
                                             domain=NATIVE_DOMAIN, epsilon=float(eps)))
        return y, s

    # -- Ops ------------------------------------------------------------------------------
    def linear(self, x, w, b=None):
        if self.compact and isinstance(w, QTensor):
            y = self._compact_linear(x, [w])
        else:
            y = self._node("MatMul", [x, self._weight(w, transpose=True)])
        return y if b is None else self._node("Add", [y, self._weight(b)])

    def linears(self, x, ws, bs):
        """Several linears of one input. Compact (onnxruntime) and alike -- QTensors of one kind (same bits, block,
        zero-point kind, kernel) or float32 matrices of one width -- one MatMulNBits / QMatMul / MatMul over the
        stacked rows, the biases as one Add, then Split: fewer, larger kernel calls per token. Otherwise one MatMul
        each (the pattern the NPU compiler knows)."""
        if not self.compact:
            return [self.linear(x, w, b) for w, b in zip(ws, bs)]
        if all(isinstance(w, QTensor) for w in ws) and len({stack_kind(w) for w in ws}) == 1:
            y = self._compact_linear(x, ws)
        elif all(isinstance(w, np.ndarray) for w in ws) and len({w.shape[1] for w in ws}) == 1:
            # x @ [w0.T | w1.T | ...]: the transposed copy a MatMul of one weight would make, made once for all
            stacked = np.empty((ws[0].shape[1], sum(w.shape[0] for w in ws)), np.float32)
            np.concatenate([w.T for w in ws], axis=1, out=stacked)
            y = self._node("MatMul", [x, self._initializer(stacked, "w")])
        else:
            return [self.linear(x, w, b) for w, b in zip(ws, bs)]
        if any(b is not None for b in bs):
            bias = [np.zeros(w.shape[0], np.float32) if b is None else b for w, b in zip(ws, bs)]
            y = self._node("Add", [y, self._initializer(np.concatenate(bias).astype(np.float32), "b")])
        sizes = self._const(np.array([w.shape[0] for w in ws], np.int64))
        outs = [self.g.fresh("split") for _ in ws]
        self.g.nodes.append(helper.make_node("Split", [y, sizes], outs, name=outs[0], axis=-1))
        self.g.split_of.update({o: (y, tuple(outs)) for o in outs})
        return outs

    def rms_norm(self, x, w, eps):
        if self._native_norm_fits(w):
            y = self.g.fresh("rmsnorm")
            self.g.nodes.append(helper.make_node(NATIVE_NORM_OP, [x, self._weight(w)], [y], name=y,
                                                 domain=NATIVE_DOMAIN, epsilon=float(eps)))
            return y
        sq = self._node("Pow", [x, self._const(np.array(2.0, np.float32))])
        mean = self._node("ReduceMean", [sq], axes=[-1], keepdims=1)
        rms = self._node("Sqrt", [self._node("Add", [mean, self._const(np.array(eps, np.float32))])])
        return self._node("Mul", [self._node("Div", [x, rms]), self._weight(w)])

    def _native_norm_fits(self, w: np.ndarray) -> bool:
        """Norms over `w`'s width are the native library's (NATIVE_NORM_OP; after a residual sum NATIVE_ADD_NORM_OP):
        in graphs of native weights, for widths of whole 16-lane groups."""
        return self.native_norms and w.shape[-1] % 16 == 0

    def add(self, a, b):
        # (a residual sum is not fused with the next RMSNorm into SkipSimplifiedLayerNormalization: its reduction
        # order differs from SimplifiedLayerNormalization's, so a layer after a slice boundary would differ in the
        # last bits from the same layer in an unsplit graph; it saved ~1 us of CPU per layer. The native AddRMSNorm
        # has no such difference: add_rms_norm)
        return self._node("Add", [a, b])

    def mul(self, a, b):
        return self._node("Mul", [a, b])

    def silu(self, x):
        return self._node("Mul", [x, self._node("Sigmoid", [x])])

    def split_heads(self, x, n_heads, head_dim):
        return self._node("Transpose", [self._node("Reshape", [x, self._shape([self.batch, -1, n_heads, head_dim])])], perm=[0, 2, 1, 3])

    def merge_heads(self, x, n_heads, head_dim):
        t = self._node("Transpose", [x], perm=[0, 2, 1, 3])
        return self._node("Reshape", [t, self._shape([self.batch, -1, n_heads * head_dim])])

    def rotate_half(self, x, head_dim):
        half = head_dim // 2
        axes = self._const(np.array([-1], np.int64))
        x1 = self._node("Slice", [x, self._const(np.array([0], np.int64)), self._const(np.array([half], np.int64)), axes])
        x2 = self._node("Slice", [x, self._const(np.array([half], np.int64)), self._const(np.array([head_dim], np.int64)), axes])
        return self._node("Concat", [self._node("Neg", [x2]), x1], axis=-1)

    def concat(self, xs, axis):
        return self._node("Concat", list(xs), axis=axis)

    def take_layer(self, x, i):
        if isinstance(x, list):  # per-layer cache inputs: nothing to copy
            return x[i]
        if self.n_layers == 1:
            return x
        return self._node(
            "Slice",
            [x, self._const(np.array([i], np.int64)), self._const(np.array([i + 1], np.int64)), self._const(np.array([0], np.int64))],
        )

    def _repeat_kv(self, x, n_rep):
        # [1,kv,L,hd] -> [1,kv,1,L,hd] -> expand [1,kv,rep,L,hd] -> [1,kv*rep,L,hd]: the HF pattern the compiler maps to Gather/Conv.
        u = self._node("Unsqueeze", [x, self._const(np.array([2], np.int64))])
        e = self._node("Expand", [u, self._node("Mul", [self._node("Shape", [u]), self._const(np.array([1, 1, n_rep, 1, 1], np.int64))])])
        shape = self._node("Shape", [x])
        dims = self._node("Concat", [self._const(np.array([1, -1], np.int64)), self._node("Slice", [shape, *self._range(2, 4)])], axis=0)
        return self._node("Reshape", [e, dims])

    def _range(self, start: int, stop: int) -> list[str]:
        return [self._const(np.array([start], np.int64)), self._const(np.array([stop], np.int64))]

    def swap_last(self, x):
        return self._node("Transpose", [x], perm=[0, 1, 3, 2])

    def attention(self, q, past_k, k, past_v, v, mask, scale, n_rep):
        if self.attention_form == "sdpa":
            return self._attention_sdpa(q, past_k, k, past_v, v, mask, scale, n_rep)
        return self._attention_split(q, past_k, k, past_v, v, mask, scale, n_rep)

    def _attention_sdpa(self, q, past_k, k, past_v, v, mask, scale, n_rep):
        """Concat + repeat + MatMul/Mul/Add/Softmax/MatMul: the pattern rknn-toolkit2 fuses into exSDPAttention."""
        keys, values = self._node("Concat", [past_k, k], axis=2), self._node("Concat", [past_v, v], axis=2)
        if n_rep > 1:
            keys, values = self._repeat_kv(keys, n_rep), self._repeat_kv(values, n_rep)
        kt = self._node("Transpose", [keys], perm=[0, 1, 3, 2])
        s = self._node("Mul", [self._node("MatMul", [q, kt]), self._const(np.array(scale, np.float32))])
        p = self._node("Softmax", [self._node("Add", [s, mask])], axis=-1)
        return self._node("MatMul", [p, values])

    def _attention_split(self, q, past_k, k, past_v, v, mask, scale, n_rep):
        """Same maths without copying the cache: query heads folded onto their kv head ([1,kv,rep*S,hd]),
        scores against past and new keys computed separately and concatenated (small), values likewise."""
        a = self.args
        # shapes from the model's constants (batch 1): no Shape/Slice/Concat chain per layer per call
        qf = self._node("Mul", [self._node("Reshape", [q, self._shape([self.batch, a.num_key_value_heads, -1, a.head_dim])]),
                                self._const(np.array(scale, np.float32))])
        s_past = self._node("MatMul", [qf, self._node("Transpose", [past_k], perm=[0, 1, 3, 2])])
        s_new = self._node("MatMul", [qf, self._node("Transpose", [k], perm=[0, 1, 3, 2])])
        m = mask if n_rep == 1 else self._node("Tile", [mask, self._const(np.array([1, 1, n_rep, 1], np.int64))])
        p = self._node("Softmax", [self._node("Add", [self._node("Concat", [s_past, s_new], axis=-1), m])], axis=-1)
        c = self._node("Slice", [self._node("Shape", [past_k]), *self._range(2, 3)])  # the context length C
        axis = self._const(np.array([-1], np.int64))
        p_past = self._node("Slice", [p, self._const(np.array([0], np.int64)), c, axis])
        p_new = self._node("Slice", [p, c, self._const(np.array([2**62], np.int64)), axis])
        o = self._node("Add", [self._node("MatMul", [p_past, past_v]), self._node("MatMul", [p_new, v])])
        return self._node("Reshape", [o, self._shape([self.batch, a.num_attention_heads, -1, a.head_dim])])

    def embed(self, table, ids):
        return self._node("Gather", [self._weight(table), ids], axis=0)


def stack_kind(w: QTensor) -> tuple:
    """What must agree for QTensors to be stacked row-wise into one MatMulNBits."""
    return (w.bits, w.block_size, w.shape[1], w.zero_points is None, w.kernel, w.mins is None)


def stack_rows(ws: list[QTensor]) -> QTensor:
    """One QTensor holding the rows of `ws` in order (a copy of one layer's q/k/v or gate/up, made at export)."""
    zp = None if ws[0].zero_points is None else np.concatenate([w.zero_points for w in ws])
    mins = None if ws[0].mins is None else np.concatenate([w.mins for w in ws])
    return QTensor(ws[0].bits, (sum(w.shape[0] for w in ws), ws[0].shape[1]), ws[0].block_size,
                   np.concatenate([w.blocks for w in ws]), np.concatenate([w.scales for w in ws]), zp,
                   " + ".join(sorted({w.origin for w in ws})), ws[0].kernel, mins)


def external_tensor(name: str, arr: np.ndarray, location: str, offset: int = 0) -> onnx.TensorProto:
    """An initializer whose bytes live outside the proto: at `offset` of file `location`, or handed over in memory."""
    t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=list(arr.shape))
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(arr.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _value_info(name: str, shape: tuple, elem: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def drop_dead_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> None:
    """Remove (in place) nodes none of whose outputs is read, e.g. a Split whose parts an op took packed."""
    while True:
        read = outputs | {i for n in nodes for i in n.input}
        live = [n for n in nodes if any(o in read for o in n.output if o)]
        if len(live) == len(nodes):
            return
        nodes[:] = live


def build_onnx(
    spec: SliceSpec,
    weights: ShardWeights,
    seq: int | None = None,
    ctx: int | None = None,
    attention_form: str = "sdpa",
    per_layer_cache: bool = False,
) -> onnx.ModelProto:
    """ONNX model of `spec` with every weight a float32 initializer inside the proto (QTensors widened): the form
    the NPU compiler reads. See build_onnx_compact for onnxruntime's form."""
    return _build(spec, weights, seq, ctx, attention_form, per_layer_cache, compact=False)[0]


def build_onnx_compact(
    spec: SliceSpec, weights: ShardWeights, attention_form: str = "split"
) -> tuple[onnx.ModelProto, dict[str, "np.ndarray | PendingPack"]]:
    """onnxruntime's form of `spec`: QTensor linears as MatMulNBits (com.microsoft), symbolic shapes, and every
    tensor over EXTERNAL_MIN_BYTES left out of the proto as an external initializer (location MEMORY_LOCATION).
    Returns the model and {initializer name: array}; the arrays are the weights' own (no copy), the native
    kernel's packed bytes PendingPacks (`materialize` makes them). Each layer's cache is an input of its own
    (onnxruntime binds each to its slot of the pool: backends/ort.py)."""
    model, ops = _build(spec, weights, None, None, attention_form, True, compact=True)
    return model, ops.g.external


def _signature(spec: SliceSpec, a: ModelArgs, seq: int | None, ctx: int | None, batched: bool, per_layer: bool,
               gqa: bool) -> tuple[list[tuple], list[tuple]]:
    """(name, shape, element type) of a slice's graph inputs and outputs. seq/ctx None -> symbolic "S"/"C";
    batched: a batch dim "B" (onnxruntime's form; k_new/v_new [n*B,...] layer-major); per_layer: caches as
    inputs past_k.i [B,kv,C,hd] instead of past_k [n,kv,C,hd]."""
    S: int | str = seq if seq is not None else "S"
    C: int | str = ctx if ctx is not None else "C"
    CS: int | str = (seq + ctx) if (seq is not None and ctx is not None) else "CS"
    H, hd, kv, n = a.hidden_size, a.head_dim, a.num_key_value_heads, spec.n_layers
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    B: int | str = "B" if batched else 1
    if spec.kind == "embed":
        return [("token_ids", (B, S), i64)], [("hidden", (B, S, H), f32)]
    if spec.kind == "head":
        return [("hidden", (B, S, H), f32)], [("logits", (B, S, a.vocab_size), f32)]
    # layer state first (whole layers: hidden), then what the attention part reads (slices/spec.py)
    ins = [(state_name(k), (B, S, state_width(a, k)), f32) for k in spec.state_inputs()]
    outs = [(state_name(k, output=True), (B, S, state_width(a, k)), f32) for k in spec.state_outputs()]
    if not spec.has_attention:
        return ins, outs
    if gqa:
        ins += [("seqlens_k", (B,), TensorProto.INT32), ("total_sequence_length", (), TensorProto.INT32),
                ("cos_cache", ("P", hd // 2), f32), ("sin_cache", ("P", hd // 2), f32)]
        outs += [(f"present_{x}.{i}", (B, kv, "T", hd), f32) for x in "kv" for i in range(n)]
    else:
        ins += [("cos", (B, 1, S, hd), f32), ("sin", (B, 1, S, hd), f32), ("mask", (B, 1, S, CS), f32)]
        outs += [("k_new", ("NB" if batched else n, kv, S, hd), f32), ("v_new", ("NB" if batched else n, kv, S, hd), f32)]
    if per_layer:
        ins += [(nm, (B, kv, C, hd), f32) for x in ("past_k", "past_v") for nm in per_layer_cache_names(x, n)]
    else:
        ins += [(x, (n, kv, C, hd), f32) for x in ("past_k", "past_v")]
    return ins, outs


def _build(
    spec: SliceSpec,
    weights: ShardWeights,
    seq: int | None,
    ctx: int | None,
    attention_form: str,
    per_layer_cache: bool,
    compact: bool,
) -> tuple[onnx.ModelProto, OnnxOps]:
    """ONNX model of `spec`. seq/ctx None -> symbolic dims "S"/"C" (one graph for all buckets).

    attention_form picks how `Ops.attention` is written out (same maths): "sdpa" for the NPU compiler, "split" for CPUs.
    per_layer_cache replaces past_k/past_v [n,kv,C,hd] by n inputs past_k.i [1,kv,C,hd]: runtimes without views
    (onnxruntime) would otherwise copy the whole cache to slice out each layer.
    The "gqa" form (compact, per-layer caches) takes GQA_INPUTS instead of cos/sin/mask and returns each layer's
    cache after the call (present_k.i, present_v.i [B,kv,T,hd]) instead of k_new/v_new.
    """
    a = weights.args
    ops = OnnxOps(attention_form, compact)
    ops.n_layers, ops.args = spec.n_layers, a
    gqa = attention_form == "gqa" and spec.has_attention
    native = "native" in slice_kernels(spec, weights)
    ops.native_attention = gqa and native
    ops.native_norms = compact and native
    assert not gqa or (compact and per_layer_cache), "the gqa form is onnxruntime's, with per-layer caches"
    ins, outs = _signature(spec, a, seq, ctx, compact and per_layer_cache, per_layer_cache, gqa)
    names: dict[str, object] = {name: name for name, _, _ in ins}
    if gqa:  # rope tables and positions are GroupQueryAttention's own inputs (GQA_INPUTS)
        names.update(cos=None, sin=None, mask=None)
    if per_layer_cache and spec.has_attention:
        for cache_name in ("past_k", "past_v"):
            names[cache_name] = per_layer_cache_names(cache_name, spec.n_layers)
    results = run_slice(ops, spec, weights, names)
    # Give outputs their public names with Identity nodes (an input may not double as an output); the gqa form's
    # present_* are GroupQueryAttention's own outputs (the runner binds them to the cache's memory)
    for name, _, _ in outs:
        if not name.startswith("present_"):
            ops.g.nodes.append(helper.make_node("Identity", [results[name]], [name], name=f"out_{name}"))
    if compact:
        drop_dead_nodes(ops.g.nodes, {name for name, _, _ in outs})
    graph = helper.make_graph(
        ops.g.nodes,
        f"exo_rknpu_{spec.name}",
        [_value_info(*i) for i in ins],
        [_value_info(*o) for o in outs],
        initializer=ops.g.initializers,
    )
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if compact else [])
    if any(n.domain == NATIVE_DOMAIN for n in ops.g.nodes):
        opsets.append(helper.make_opsetid(NATIVE_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="exo-rknpu")
    model.ir_version = IR_VERSION
    return model, ops
