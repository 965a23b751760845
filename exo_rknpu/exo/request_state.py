"""What a request carries around the ring in exo's `inference_state` (exo-free).

exo passes `inference_state` (a dict) with every prompt and tensor hop: gRPC sends its non-tensor values as JSON
(`InferenceState.other_data_json`), and each engine hands it back from infer_prompt / infer_tensor. exo-rknpu puts
two values there, under keys no exo engine uses:

* `rknpu_sampling`: the request's SamplingParams (`SamplingParams.to_json()`), read by the node that samples;
* `rknpu_prompt_ids`: the prompt's token ids as the API node encoded them (special tokens written inside message
  content encoded as text, see exo_rknpu.exo.prompt_tokens), used by the first node instead of re-encoding the
  prompt string.

A node that receives malformed values fails the request (they come from a peer, not from the client).
"""

from __future__ import annotations

from typing import Any

from exo_rknpu.runtime.sampling import SamplingParams

SAMPLING_KEY = "rknpu_sampling"
PROMPT_IDS_KEY = "rknpu_prompt_ids"


class StateError(ValueError):
    """inference_state holds a malformed exo-rknpu value."""


def request_state(params: SamplingParams, prompt_ids: list[int] | None) -> dict[str, Any]:
    """The inference_state the API node starts a request with."""
    state: dict[str, Any] = {SAMPLING_KEY: params.to_json()}
    if prompt_ids is not None:
        state[PROMPT_IDS_KEY] = [int(t) for t in prompt_ids]
    return state


def sampling_params(state: Any) -> SamplingParams | None:
    """The request's SamplingParams, or None if the state carries none (a request not started by exo-rknpu)."""
    if not isinstance(state, dict) or state.get(SAMPLING_KEY) is None:
        return None
    try:
        return SamplingParams.from_json(state[SAMPLING_KEY])
    except (TypeError, ValueError) as e:
        raise StateError(f"malformed sampling parameters from a peer: {e}") from None


def prompt_ids(state: Any) -> list[int] | None:
    """The prompt's token ids as the API encoded them, or None."""
    if not isinstance(state, dict) or state.get(PROMPT_IDS_KEY) is None:
        return None
    ids = state[PROMPT_IDS_KEY]
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                       for t in ids):
        raise StateError("malformed prompt token ids from a peer")
    return ids
