"""The benchmark harness behind `exo-rknpu bench`: each contender (our runtime, transformers, llama.cpp) runs in
its own subprocess (`python -m exo_rknpu.bench.worker`) so its peak resident memory is its own; contenders
alternate run by run and are compared by ratios of medians. Peers' libraries are imported only in the worker.
"""
