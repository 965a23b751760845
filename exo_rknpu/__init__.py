"""exo-rknpu: layer-range LLM slices for RK3588 NPUs and CPUs, as exo pipeline nodes."""

__version__ = "0.1.0"
