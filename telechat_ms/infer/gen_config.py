"""GenerationConfig: decoding settings, with defaults read from a checkpoint's generation_config.json (spec 5)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from telechat_ms.errors import ConfigError
from telechat_ms.io import read_json_object

GENERATION_CONFIG_FILE = "generation_config.json"

# The released TeleChat2 generation_config.json (spec section 5), for users who want those settings by name.
RELEASED_DEFAULTS: dict[str, Any] = dict(max_new_tokens=4096, do_sample=False, temperature=0.3, top_k=5, top_p=0.85,
                                         repetition_penalty=1.03, eos_token_id=2)


@dataclass
class GenerationConfig:
    """How to pick tokens: greedy or sampling, the HF processors, the length limit and the stop ids."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] | None = 2   # <_end>; None disables it
    stop_token_ids: list[int] = field(default_factory=list)  # extra ids that end a row (not emitted as text)
    pad_token_id: int = 3
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str = "GenerationConfig") -> None:
        """Raise ConfigError naming the field when a value cannot work."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ConfigError(f"{source}: field 'max_new_tokens' must be a positive integer, "
                              f"got {self.max_new_tokens!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ConfigError(f"{source}: field 'top_k' must be an integer >= 0, got {self.top_k!r}")
        for name, ok, bound in (("temperature", lambda x: x >= 0, ">= 0"), ("top_p", lambda x: 0 < x <= 1, "in (0, 1]"),
                                ("repetition_penalty", lambda x: x > 0, "> 0")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ConfigError(f"{source}: field '{name}' must be a number {bound}, got {value!r}")
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"{source}: field 'do_sample' must be true or false, got {self.do_sample!r}")
        for name in ("eos_token_id", "stop_token_ids"):
            ids = self._as_list(getattr(self, name))
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                raise ConfigError(f"{source}: field '{name}' must be token ids (integers >= 0), "
                                  f"got {getattr(self, name)!r}")

    @staticmethod
    def _as_list(value: Any) -> list:
        if value is None:
            return []
        return list(value) if isinstance(value, (list, tuple)) else [value]

    @property
    def stop_ids(self) -> set[int]:
        """Every id that ends a row: eos_token_id(s) plus stop_token_ids."""
        return set(self._as_list(self.eos_token_id)) | set(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (do_sample false, or temperature 0)."""
        return not self.do_sample or self.temperature == 0

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with fields changed; unknown names raise ConfigError listing the known ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown generation option(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "generation config") -> "GenerationConfig":
        """Known keys of an HF generation_config.json dict; the rest (max_length, user_token_id, ...) ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and v is not None}
        if isinstance(kwargs.get("stop_token_ids"), int):
            kwargs["stop_token_ids"] = [kwargs["stop_token_ids"]]
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("GenerationConfig", source, 1)) from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None) -> "GenerationConfig":
        """generation_config.json of a checkpoint directory when present, else the built-in defaults."""
        if path is None:
            return cls()
        file = os.path.join(os.fspath(path), GENERATION_CONFIG_FILE) if os.path.isdir(path) else os.fspath(path)
        if not os.path.isfile(file):
            return cls()
        return cls.from_dict(read_json_object(file, ConfigError), source=file)

    @classmethod
    def released(cls, **overrides: Any) -> "GenerationConfig":
        """The released TeleChat2 settings (spec section 5), with overrides."""
        return cls(**{**RELEASED_DEFAULTS, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_generation_config(model) -> GenerationConfig:
    """The model's defaults: generation_config.json next to its checkpoint (cached on the model)."""
    cached = model.__dict__.get("_telechat_generation_config")
    if cached is None:
        cached = GenerationConfig.from_pretrained(model.__dict__.get("name_or_path"))
        model.__dict__["_telechat_generation_config"] = cached
    return cached
