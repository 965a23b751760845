"""Plan and run a benchmark: contenders alternate round by round, each run in its own worker process, and
the report compares them by ratios of medians (a shared, noisy machine disturbs single runs, not the middle)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import exo_rknpu
from exo_rknpu.bench.bandwidth import Bandwidth, measure_bandwidth
from exo_rknpu.bench.options import BenchOptions, validate
from exo_rknpu.bench.worker import EXIT_MISSING, OURS, Job, RunFigures
from exo_rknpu.errors import BenchError, LayerRangeError
from exo_rknpu.model.base import LayerRange, parse_split
from exo_rknpu.model.loader import load_header, load_tokenizer
from exo_rknpu.model.tokenizer import Tokenizer
from exo_rknpu.model.zoo import ModelSource, resolve_model
from exo_rknpu.runtime.placement import PlacementPlan, ResolvedPlan, default_buckets, plan_shards

Progress = Callable[[str], None]
SCHEMA = 1
# Figures compared between contenders (medians over runs); ratios are ours / peer.
METRICS = ("decode_tok_s", "prefill_tok_s", "ttft_s", "load_s", "peak_rss_mb")
# The prompt is this text's token ids, repeated and cut to exactly --prompt-tokens ids.
PROMPT_TEXT = (
    "A pipeline-parallel cluster splits a language model into consecutive layer ranges. Each board holds the "
    "weights of its own range, receives hidden states from the previous node, runs its layers, and hands the "
    "result to the next node in the ring, until the last node turns hidden states into a token. "
)


def prompt_ids(tok: Tokenizer, n: int) -> list[int]:
    """Exactly `n` deterministic token ids: PROMPT_TEXT's ids repeated and cut (no BOS, no special tokens)."""
    base = tok.encode(PROMPT_TEXT)
    if not base:
        raise BenchError("the model's tokenizer encodes the benchmark prompt to nothing")
    return (base * (n // len(base) + 1))[:n]


@dataclass
class BenchPlan:
    """Options checked against the model: the source, its layer ranges and the prompt every contender gets."""

    options: BenchOptions
    source: ModelSource
    ranges: list[LayerRange]
    prompt_ids: list[int]
    placements: list[ResolvedPlan] = field(default_factory=list)  # --placement resolved for each range

    @property
    def emulated(self) -> bool:
        """A placement's NPU devices run on the CPU here: its speed is never an NPU's."""
        return any(r.emulated for r in self.placements)

    def job(self, contender: str, count_bytes: bool = True) -> Job:
        o = self.options
        return Job(
            contender=contender, model_path=str(self.source.path), model_format=self.source.format,
            prompt_ids=self.prompt_ids, gen_tokens=o.gen_tokens, threads=o.n_threads, backend=o.backend,
            split=[str(r) for r in self.ranges] if o.split else [], weights=o.weights,
            backend_dtype=o.backend_dtype, max_context=o.max_context, layers_per_slice=o.layers_per_slice,
            count_bytes=count_bytes, placement=o.placement, emulate=o.emulate,
        )


def plan(o: BenchOptions, progress: Progress) -> BenchPlan:
    """Validate `o` (options first, then against the model's config and tokenizer); nothing heavy is loaded."""
    validate(o)
    src = resolve_model(o.model, progress=progress)
    header = load_header(src)
    margs = header.args
    n = margs.num_hidden_layers
    try:
        ranges = parse_split(o.split, n) if o.split else [LayerRange.full(n)]
    except LayerRangeError as e:  # a bad --split is a usage error like any other option
        raise BenchError(str(e)) from None
    limit = default_buckets(margs, o.max_context).max_context
    if o.prompt_tokens + o.gen_tokens > limit:
        raise BenchError(f"--prompt-tokens {o.prompt_tokens} + --gen-tokens {o.gen_tokens} exceeds the context limit "
                         f"{limit} (raise --max-context, up to the model's {margs.max_position_embeddings})")
    placements = []
    if o.placement is not None:  # a plan that cannot run is refused here, in one line, before any weights load
        plan_ = PlacementPlan.load(o.placement)
        buckets = default_buckets(margs, o.max_context)
        placements = plan_shards(plan_, margs, ranges, o.backend, buckets, layers_per_slice=o.layers_per_slice,
                                 weights=o.weights, npu_dtype=o.backend_dtype or "fp16", emulate=o.emulate)
    return BenchPlan(o, src, ranges, prompt_ids(load_tokenizer(header), o.prompt_tokens), placements)


@dataclass
class Run:
    """One worker process: its figures, or why there are none."""

    round: int
    contender: str
    figures: RunFigures | None = None
    error: str | None = None
    missing: bool = False  # the contender's library is not installed (a note, not a failure)
    load_1m: float | None = None  # the machine's 1-minute load average as the run started: other jobs' noise


def run_worker(job: Job, timeout_s: float) -> tuple[RunFigures | None, str | None, bool]:
    """Run one job in `python -m exo_rknpu.bench.worker`; returns (figures, error, missing)."""
    env = dict(os.environ)
    root = str(Path(exo_rknpu.__file__).resolve().parents[1])  # the worker imports this very exo_rknpu
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # numpy's BLAS and torch's OpenMP
        env[var] = str(job.threads)
    try:
        proc = subprocess.run([sys.executable, "-m", "exo_rknpu.bench.worker"], input=json.dumps(asdict(job)),
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:g} s (--timeout)", False
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode == EXIT_MISSING:
        return None, json.loads(last)["missing"], True
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return None, f"worker exited with status {proc.returncode}: {lines[-1] if lines else '(no message)'}", False
    return RunFigures(**json.loads(last)), None, False


@dataclass
class Summary:
    """A contender's runs, medians and (for peers) ratios."""

    name: str
    label: str
    runs: list[RunFigures] = field(default_factory=list)
    note: str | None = None

    def medians(self) -> dict[str, float | None]:
        """Median of each metric over the runs (None for every metric when nothing was measured)."""
        return {m: statistics.median(getattr(r, m) for r in self.runs) if self.runs else None for m in METRICS}

    def bytes_per_token(self) -> int | None:
        return next((r.weight_bytes_per_token for r in self.runs if r.weight_bytes_per_token), None)

    def roofline_pct(self, bw: Bandwidth) -> float | None:
        b = self.bytes_per_token()
        decode = self.medians()["decode_tok_s"]
        if decode is None or b is None or bw.gb_s <= 0:
            return None
        return 100.0 * decode * b / (bw.gb_s * 1e9)

    def figures(self, bw: Bandwidth) -> dict[str, Any]:
        return {**self.medians(), "weight_bytes_per_token": self.bytes_per_token(), "roofline_pct": self.roofline_pct(bw)}


def ratios(ours: Summary, peer: Summary) -> dict[str, float]:
    """ours / peer for each metric, from the medians (decode_tok_s 0.5: we decode at half the peer's speed)."""
    a, b = ours.medians(), peer.medians()
    return {m: a[m] / b[m] for m in METRICS if a[m] is not None and b[m]}


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    """How many leading token ids two greedy runs share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def label(p: BenchPlan, contender: str) -> str:
    o = p.options
    if contender == OURS:
        split = f" split {','.join(str(r) for r in p.ranges)}" if o.split else ""
        placed = f" placement {o.placement}" + (" (emulated)" if p.emulated else "") if o.placement else ""
        return f"exo-rknpu {o.backend}{'/' + o.backend_dtype if o.backend_dtype else ''} weights={o.weights}{split}{placed}"
    if contender == "transformers":
        return "transformers (torch CPU, fp32)"
    return "llama.cpp (llama-cpp-python, weights as stored in the GGUF)"


@dataclass
class Report:
    plan: BenchPlan
    bandwidth: Bandwidth
    summaries: dict[str, Summary]
    runs: list[Run]
    notes: list[str]
    complete: bool

    @property
    def ours(self) -> Summary:
        return self.summaries[OURS]

    def busy_note(self) -> str | None:
        """A warning when other jobs kept the CPUs busy while measuring (median load average above the CPU count)."""
        loads = [r.load_1m for r in self.runs if r.load_1m is not None]
        cpus = os.cpu_count() or 1
        if not loads or statistics.median(loads) <= cpus:
            return None
        return (f"busy machine: median load average {statistics.median(loads):.1f} on {cpus} CPUs while measuring; "
                f"speeds are disturbed by other jobs (memory and bytes per token are not)")

    def to_json(self) -> dict[str, Any]:
        o, bw, ours = self.plan.options, self.bandwidth, self.ours
        first = ours.runs[0].token_ids if ours.runs else []
        peers: dict[str, Any] = {}
        all_ratios: dict[str, dict[str, float]] = {}
        for name in o.compare:
            s = self.summaries[name]
            peers[name] = {"label": s.label, "n_runs": len(s.runs), "note": s.note, **s.figures(bw),
                           "agreeing_tokens": agreeing_prefix(first, s.runs[0].token_ids) if s.runs and first else None}
            if s.runs and ours.runs:
                all_ratios[name] = ratios(ours, s)
        return {
            "schema": SCHEMA,
            "model": self.plan.source.name,
            "model_format": self.plan.source.format,
            "label": ours.label,
            "backend": o.backend,
            "split": [str(r) for r in self.plan.ranges],
            "placement": o.placement,
            "emulated": self.plan.emulated,
            "weights": o.weights,
            "threads": o.n_threads,
            "prompt_tokens": o.prompt_tokens,
            "gen_tokens": o.gen_tokens,
            "repeat": o.repeat,
            "machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "bandwidth_gb_s": bw.gb_s,
                        "bandwidth_method": bw.method},
            **ours.figures(bw),
            "n_runs": len(ours.runs),
            "peers": peers,
            "ratios": all_ratios,
            "runs": [{"round": r.round, "contender": r.contender, "error": r.error, "load_1m": r.load_1m,
                      **({k: v for k, v in asdict(r.figures).items() if k != "token_ids"} if r.figures else {})}
                     for r in self.runs],
            "token_ids": first,
            "notes": self.notes + [n for n in [self.busy_note()] if n],
            "complete": self.complete,
        }


def run_bench(p: BenchPlan, progress: Progress, worker: Callable[[Job, float], tuple] = run_worker) -> Report:
    """Measure the bandwidth, then `repeat` rounds of ours, peer, peer ... each in a fresh worker process.

    A peer whose library is missing or whose run fails is dropped with a note; if our own first run fails
    there is nothing to compare and the rounds stop. Ctrl-C stops the rounds too; in every case the report
    holds every run that finished."""
    o = p.options
    progress(f"measuring memory bandwidth ({o.n_threads} thread(s)) ...")
    bw = measure_bandwidth(o.n_threads)
    summaries = {c: Summary(c, label(p, c)) for c in (OURS, *o.compare)}
    active = list(summaries)
    runs: list[Run] = []
    notes: list[str] = []
    complete = True
    try:
        for k in range(1, o.repeat + 1):
            for c in list(active):
                progress(f"round {k}/{o.repeat}: {summaries[c].label} ...")
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                # the bytes a decode step reads do not change between runs: counted on a contender's first
                figures, error, missing = worker(p.job(c, count_bytes=not summaries[c].runs), o.timeout_s)
                runs.append(Run(k, c, figures, error, missing, load))
                if figures is not None:
                    summaries[c].runs.append(figures)
                    progress(f"  decode {figures.decode_tok_s:.1f} tok/s, prefill {figures.prefill_tok_s:.1f} tok/s, "
                             f"load {figures.load_s:.1f} s, peak {figures.peak_rss_mb:.0f} MiB")
                    continue
                note = f"{c}: {'not measured' if missing else 'failed'}: {error}"
                progress(f"  {note}")
                notes.append(note)
                summaries[c].note = note
                active.remove(c)
                if c == OURS and not summaries[c].runs:  # nothing to compare the peers with
                    for peer in o.compare:
                        summaries[peer].note = summaries[peer].note or f"{peer}: not run: {OURS} failed"
                    return Report(p, bw, summaries, runs, notes, complete=False)
    except KeyboardInterrupt:
        notes.append("interrupted: the report holds the runs that finished")
        complete = False
    return Report(p, bw, summaries, runs, notes, complete and len(summaries[OURS].runs) == o.repeat)
