"""Exception types. Each message says what is wrong and, where there is one, what to run."""


class ExoRknpuError(Exception):
    """Base of every error this package raises on purpose."""


class UsageError(ExoRknpuError, ValueError):
    """A command-line option (or request parameter) is out of range or does not fit the model."""


class UnsupportedModelError(ExoRknpuError, ValueError):
    """The model's architecture (or a feature of it) is not supported."""


class UnknownModelError(ExoRknpuError, ValueError):
    """A model name is neither a path nor a known alias."""


class WeightsError(ExoRknpuError, ValueError):
    """A weights file is missing, corrupt, truncated or lacks a tensor."""


class LayerRangeError(ExoRknpuError, ValueError):
    """A layer range is empty or lies outside the model."""


class TensorContractError(ExoRknpuError, ValueError):
    """An input tensor has the wrong kind, rank, width or dtype for this shard."""


class ContextOverflowError(ExoRknpuError, ValueError):
    """A request would grow past the largest context bucket."""


class BackendUnavailableError(ExoRknpuError, RuntimeError):
    """A backend cannot run here (missing runtime, wrong machine, missing driver)."""


class UnsupportedSliceError(ExoRknpuError, ValueError):
    """A backend was asked to run a slice it does not support."""


class ToolkitMissingError(ExoRknpuError, RuntimeError):
    """The rknn-toolkit2 environment is missing or broken."""


class ArtifactError(ExoRknpuError, ValueError):
    """A compiled artefact or manifest is missing, corrupt, or does not match the model/platform."""


MODEL_PLACEHOLDER = "--model MODEL "  # in compile commands built where the model's name is not known (backends)


def name_model(message: str, model_ref: str | None) -> str:
    """A message's compile command with the model named as `exo-rknpu compile --model` takes it."""
    return message.replace(MODEL_PLACEHOLDER, f"--model {model_ref} ") if model_ref else message


class CompileError(ExoRknpuError, RuntimeError):
    """The RKNN compiler failed, or a compiled slice failed verification."""


class CapacityError(ExoRknpuError, RuntimeError):
    """A new request does not fit (live-request count or KV-memory budget): refused, nothing live is evicted."""


class ShardTooLargeError(ExoRknpuError, RuntimeError):
    """A shard's weights and KV budget need more memory than this node has: refused before anything loads."""


class RequestStateError(ExoRknpuError, RuntimeError):
    """A request cannot continue here: this node holds no cache for it (released, never started, node restarted)."""


class BenchError(UsageError):
    """A benchmark option is out of range or does not fit the model."""


class SamplingError(ExoRknpuError, RuntimeError):
    """The logits cannot be sampled from (NaN or infinite values)."""


class ModelUnavailableError(ExoRknpuError, RuntimeError):
    """A model's files are not on this node and cannot be fetched here (offline, or no repository for this engine)."""


class NativeUnavailableError(BackendUnavailableError):
    """The native quantized-matmul library cannot be built here (no C compiler, or the compiler failed)."""
