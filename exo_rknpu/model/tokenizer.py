"""Tokenizers from HF folders (tokenizer.json) or GGUF metadata, and chat templates rendered as transformers does.

BOS handling is explicit: `encode(text, add_special_tokens=True)` prepends BOS only when the model says so
(`add_bos_token` in tokenizer_config.json / `tokenizer.ggml.add_bos_token`). Prompts rendered by a chat
template already contain their special tokens, so encode them with add_special_tokens=False (as transformers does).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from exo_rknpu.errors import UnsupportedModelError, WeightsError
from exo_rknpu.model.hf import all_ids, read_json

if TYPE_CHECKING:  # the GGUF reader is imported where a GGUF tokenizer is built
    from exo_rknpu.model.gguf import GGUFFile

# Pre-tokenizer regexes, as in llama.cpp's llama-vocab.cpp and the models' tokenizer.json files.
QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZERS = ("smollm", "qwen2", "llama-bpe", "gpt-2")
_TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special-token policy and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        add_bos: bool = False,
        special_tokens: Mapping[str, str | None] | None = None,
        extra_eos_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ) -> None:
        """`special_tokens` maps bos_token/eos_token/unk_token/pad_token/... to token strings (None = absent);
        `extra_eos_ids` are further stop ids (e.g. generation_config's eos list)."""
        self.backend = backend
        self.add_bos = add_bos
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self._extra_eos = tuple(int(i) for i in extra_eos_ids)
        if add_bos and self.bos_token_id is None:
            raise UnsupportedModelError("the tokenizer should add a BOS token but defines none")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_hf_dir(cls, folder: Path) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja, generation_config.json, config.json)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise WeightsError(f"{path} not found: only fast tokenizers (tokenizer.json) are supported")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise WeightsError(f"cannot load {path}: {e}") from None
        tc = _optional_json(folder / "tokenizer_config.json")
        special = {k: _token_content(tc.get(k)) for k in _TEMPLATE_TOKENS}
        add_bos = tc.get("add_bos_token")
        if add_bos is None:
            # No explicit setting: follow tokenizer.json's post-processor (llama3 adds BOS there).
            bos_id = backend.token_to_id(special["bos_token"]) if special["bos_token"] else None
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
        extra: list[int] = []
        for name in ("config.json", "generation_config.json"):
            extra += all_ids(_optional_json(folder / name).get("eos_token_id"))
        return cls(backend, add_bos=bool(add_bos), special_tokens=special, extra_eos_ids=extra,
                   chat_template=_hf_chat_template(folder, tc))

    @classmethod
    def from_gguf(cls, path: "Path | GGUFFile") -> "Tokenizer":
        """Build a byte-level BPE tokenizer from GGUF `tokenizer.ggml.*` metadata (of a file, or of its header
        parsed already)."""
        from exo_rknpu.model.gguf import GGUFFile

        g = path if isinstance(path, GGUFFile) else GGUFFile(Path(path))
        return tokenizer_from_gguf_metadata(g.get, source=str(g.path))

    # ------------------------------------------------------------------ ids

    def _id(self, key: str) -> int | None:
        tok = self.special_tokens.get(key)
        return None if tok is None else self.backend.token_to_id(tok)

    @cached_property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @cached_property
    def eos_token_id(self) -> int | None:
        """The primary end-of-sequence id (tokenizer's eos_token, else the first configured stop id)."""
        eos = self._id("eos_token")
        return eos if eos is not None else (self._extra_eos[0] if self._extra_eos else None)

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation (eos_token plus config/generation_config eos lists)."""
        ids = set(self._extra_eos)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return frozenset(ids)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. With add_special_tokens, BOS is prepended only if the model asks for it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id, *ids]  # type: ignore[list-item]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` with the model's chat template, exactly as transformers' apply_chat_template(tokenize=False).

        Extra keyword arguments are passed to the template (like transformers' template kwargs).
        """
        if not self.chat_template:
            raise UnsupportedModelError("this model has no chat template; send a plain prompt instead")
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        # transformers drops None-valued keys (OpenAI-style content=None) before rendering.
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **kwargs}
        return render_chat_template(self.chat_template, chat, add_generation_prompt=add_generation_prompt, **variables)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


def encode_prompt(tok: Tokenizer, text: str) -> list[int]:
    """Ids of a prompt as every entry point sends it to the model (the CLI's generate and the exo node alike).

    Special tokens written in the text (a rendered chat template's) are kept as they are; BOS is prepended only
    if the model wants one (`Tokenizer.add_bos`: tokenizer_config.json's add_bos_token, else tokenizer.json's
    post-processor, or GGUF's tokenizer.ggml.add_bos_token) and the text does not already start with it.
    """
    ids = tok.encode(text, add_special_tokens=False)
    if tok.add_bos and tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id, *ids]
    return ids


class IncrementalDecoder:
    """Streams text as ids arrive, holding back incomplete UTF-8 sequences (shown as U+FFFD by the decoder).

    Decodes a short window of recent ids each time (prefix/read offsets, as TGI and vLLM do), so spaces and
    multi-byte characters come out right without re-decoding the whole sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids up to here have been emitted

    def _text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly printable text ("" if it is still incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self._text(self.ids[self._prefix : self._read])
        new_text = self._text(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated character at the end of generation)."""
        prefix_text = self._text(self.ids[self._prefix : self._read])
        new_text = self._text(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :]


# ---------------------------------------------------------------------- chat templates


def render_chat_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """Render a chat template in a jinja2 environment configured like transformers' (5.x) one."""
    return _compile_template(template).render(
        messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
    )


def _compile_template(template: str) -> Any:
    # Imported here: jinja2 is only needed by chat-serving paths.
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it for assistant masks)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Like transformers: no HTML escaping, and json.dumps options exposed.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class TemplateNamespace(jinja2.utils.Namespace):
        """namespace() that refuses underscore names (as transformers does, to keep the sandbox tight)."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's Namespace signature trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = dict
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)


# ---------------------------------------------------------------------- HF helpers


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.exists() else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config special tokens are strings or serialized AddedTokens ({"content": ...})."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(folder: Path, tc: Mapping[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json's chat_template (as in transformers)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    tpl = tc.get("chat_template")
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, Mapping)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None


# ---------------------------------------------------------------------- GGUF tokenizer


def _gguf_pre_tokenizer(pre: str) -> tuple[Any, bool]:
    """(pre-tokenizer, ignore_merges) for a `tokenizer.ggml.pre` value."""
    if pre == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]), False
    if pre == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in ("qwen2", "llama-bpe"):
        regex = QWEN2_RE if pre == "qwen2" else LLAMA3_RE
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]), pre == "llama-bpe"  # llama.cpp and Llama-3's tokenizer.json both ignore merges for whole-word hits
    raise UnsupportedModelError(
        f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(GGUF_PRE_TOKENIZERS)}"
    )


def tokenizer_from_gguf_metadata(get: Any, source: str = "GGUF") -> Tokenizer:
    """Build a Tokenizer from a metadata getter `get(key, default=None)` (GGUFFile.get)."""
    model = get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UnsupportedModelError(
            f"{source}: GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2'); "
            "use the model's Hugging Face folder with tokenizer.json instead"
        )
    tokens: list[str] = list(get("tokenizer.ggml.tokens") or [])
    merges_raw: Sequence[str] = get("tokenizer.ggml.merges") or []  # GGUFFile: read one at a time (StringArray)
    types: list[int] = list(get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if not tokens:
        raise WeightsError(f"{source} has no tokenizer.ggml.tokens")
    pre_tok, ignore_merges = _gguf_pre_tokenizer(str(get("tokenizer.ggml.pre", "gpt-2") or "gpt-2"))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab, _MergePairs(merges_raw), ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tok
    backend.decoder = decoders.ByteLevel()
    # token_type 3 (control) and 4 (user-defined) are matched whole, before BPE, and skipped when decoding.
    specials = [AddedToken(tok, special=True, normalized=False) for tok, t in zip(tokens, types) if t in (3, 4)]
    backend.add_special_tokens(specials)

    def token(key: str) -> str | None:
        i = get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    extra = [int(i) for k in ("eot_token_id", "eom_token_id") if (i := get(f"tokenizer.ggml.{k}")) is not None]
    extra += gguf_end_of_generation_ids(tokens, types)
    return Tokenizer(backend, add_bos=bool(get("tokenizer.ggml.add_bos_token", False)), special_tokens=special,
                     extra_eos_ids=extra, chat_template=get("tokenizer.chat_template"))


class _MergePairs(Sequence[tuple[str, str]]):
    """GGUF's "a b" merge lines as the (a, b) pairs tokenizers' BPE takes, each made as it is read.

    Not a list of tuples: CPython keeps up to 2000 freed 2-tuples for reuse, and ~49k of them made at once leave
    those scattered over the memory the merges took, pinning it for the whole run (~2 MiB resident on smollm2).
    """

    def __init__(self, lines: Sequence[str]) -> None:
        self._lines = lines

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i: int) -> tuple[str, ...]:  # type: ignore[override]  # no slices: BPE reads by index
        return tuple(self._lines[i].split(" ", 1))


# Control tokens llama.cpp treats as end-of-generation by their text (llama-vocab.cpp, special_eog_ids): a Qwen GGUF
# names only <|im_end|> as eos, but its generation_config also stops at <|endoftext|>.
GGUF_EOG_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>")


def gguf_end_of_generation_ids(tokens: Sequence[str], types: Sequence[int]) -> list[int]:
    """Ids of control tokens (token_type 3) whose text marks the end of generation, as llama.cpp finds them."""
    return [i for i, (tok, t) in enumerate(zip(tokens, types)) if t == 3 and tok in GGUF_EOG_TOKENS]
